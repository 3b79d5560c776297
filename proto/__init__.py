"""kvbridge.proto."""
