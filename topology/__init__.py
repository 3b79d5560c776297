"""kvbridge.topology."""
