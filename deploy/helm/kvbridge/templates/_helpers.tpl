{{/* Names, labels and the shared pieces of the prefill and decode workloads. */}}

{{- define "kvbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; role objects append -prefill / -decode(-headless). */}}
{{- define "kvbridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvbridge.labels" -}}
helm.sh/chart: {{ include "kvbridge.chart" . }}
{{ include "kvbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvbridge
{{- end }}

{{/* (dict "root" $ "role" "prefill") */}}
{{- define "kvbridge.roleSelectorLabels" -}}
{{ include "kvbridge.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "kvbridge.roleLabels" -}}
{{ include "kvbridge.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "kvbridge.roleName" -}}
{{- printf "%s-%s" (include "kvbridge.fullname" .root) .role }}
{{- end }}

{{- define "kvbridge.headlessName" -}}
{{- printf "%s-%s-headless" (include "kvbridge.fullname" .root) .role }}
{{- end }}

{{- define "kvbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvbridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Secret names (generated or existing). */}}
{{- define "kvbridge.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "kvbridge.fullname" .)) .Values.auth.tls.existingSecret }}
{{- end }}

{{- define "kvbridge.generatedAuthSecretName" -}}
{{- printf "%s-auth" (include "kvbridge.fullname" .) }}
{{- end }}

{{- define "kvbridge.tokenSecretName" -}}
{{- default (include "kvbridge.generatedAuthSecretName" .) .Values.auth.token.existingSecret }}
{{- end }}

{{- define "kvbridge.sideSecretName" -}}
{{- default (include "kvbridge.generatedAuthSecretName" .) .Values.auth.sideSecret.existingSecret }}
{{- end }}

{{/* The daemon config of a role: `config` merged with `<role>.config`. Returns YAML. */}}
{{- define "kvbridge.roleConfig" -}}
{{- $root := .root }}
{{- $cfg := mustMergeOverwrite (deepCopy $root.Values.config) (deepCopy (index $root.Values .role).config) }}
{{- if eq .role "decode" }}
{{- $_ := set $cfg "prefill_policy" $root.Values.decode.prefillPolicy }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* In-cluster DNS suffix of the release namespace: <ns>.svc.<clusterDomain>. */}}
{{- define "kvbridge.nsDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* Probe mode after resolving "auto". */}}
{{- define "kvbridge.probeMode" -}}
{{- if eq .Values.probes.mode "auto" }}
{{- ternary "grpc" "exec" .Values.auth.insecure }}
{{- else }}
{{- .Values.probes.mode }}
{{- end }}
{{- end }}

{{/* The --prefill targets of the decode daemons, one per line. */}}
{{- define "kvbridge.prefillTargets" -}}
{{- $root := . }}
{{- $headless := include "kvbridge.headlessName" (dict "root" $root "role" "prefill") }}
{{- $domain := include "kvbridge.nsDomain" $root }}
{{- $port := int $root.Values.ports.grpc }}
{{- if eq $root.Values.decode.prefillDiscovery "pods" }}
{{- $sts := include "kvbridge.roleName" (dict "root" $root "role" "prefill") }}
{{- range $i := until (int $root.Values.prefill.replicas) }}
{{ printf "%s-%d.%s.%s:%d" $sts $i $headless $domain $port }}
{{- end }}
{{- else if gt (int $root.Values.prefill.replicas) 0 }}
{{ printf "dns:///%s.%s:%d" $headless $domain $port }}
{{- end }}
{{- range $root.Values.decode.prefillEndpoints }}
{{ . }}
{{- end }}
{{- end }}

{{/* Checks of values that the schema cannot express. */}}
{{- define "kvbridge.validate" -}}
{{- $p := .Values.ports }}
{{- if ne (len (uniq (list (int $p.grpc) (int $p.side) (int $p.metrics) (int $p.http)))) 4 }}
{{- fail (printf "ports: grpc (%v), side (%v), metrics (%v) and http (%v) must be distinct" $p.grpc $p.side $p.metrics $p.http) }}
{{- end }}
{{- $pb := (mustMergeOverwrite (deepCopy .Values.config) (deepCopy .Values.prefill.config)).backend }}
{{- $db := (mustMergeOverwrite (deepCopy .Values.config) (deepCopy .Values.decode.config)).backend }}
{{- if ne $pb $db }}
{{- fail (printf "config.backend: prefill uses %q but decode uses %q; both roles must use the same transfer backend" $pb $db) }}
{{- end }}
{{- range $role := list "prefill" "decode" }}
{{- $drain := (include "kvbridge.roleConfig" (dict "root" $ "role" $role) | fromYaml).drain_timeout | default 30 }}
{{- if le (float64 $.Values.terminationGracePeriodSeconds) (float64 $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed the %s daemons' drain_timeout (%v): SIGTERM would kill in-flight requests" $.Values.terminationGracePeriodSeconds $role $drain) }}
{{- end }}
{{- end }}
{{- if and (gt (int .Values.decode.replicas) 0) (eq (int .Values.prefill.replicas) 0) (empty .Values.decode.prefillEndpoints) }}
{{- fail "decode.replicas > 0 but there is no prefill daemon: set prefill.replicas > 0 or decode.prefillEndpoints" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics: enable serviceMonitor or podMonitor, not both (each pod would be scraped twice)" }}
{{- end }}
{{- if and (eq .Values.probes.mode "grpc") (not .Values.auth.insecure) }}
{{- fail "probes.mode=grpc needs auth.insecure=true: the native gRPC probe cannot speak TLS (use exec or auto)" }}
{{- end }}
{{- $cm := .Values.auth.tls.certManager }}
{{- if and $cm.enabled .Values.auth.tls.existingSecret }}
{{- fail "auth.tls: certManager.enabled writes the TLS Secret; it cannot be combined with existingSecret" }}
{{- end }}
{{- if and $cm.enabled (not $cm.issuerRef.name) }}
{{- fail "auth.tls.certManager.issuerRef.name: name the Issuer or ClusterIssuer that signs the daemons' certificate" }}
{{- end }}
{{- if and (not .Values.auth.insecure) (not .Values.auth.tls.create) (not .Values.auth.tls.existingSecret) (not $cm.enabled) }}
{{- fail "auth: TLS is on (auth.insecure=false) but there is no certificate: set auth.tls.existingSecret, auth.tls.certManager.enabled or auth.tls.create=true" }}
{{- end }}
{{- end }}

{{/* Every DNS name the TLS certificate covers (YAML list). */}}
{{- define "kvbridge.tlsDnsNames" -}}
{{- $full := include "kvbridge.fullname" . }}
{{- $domain := include "kvbridge.nsDomain" . }}
{{- $ns := .Release.Namespace }}
{{- $dns := list "localhost" $full (printf "%s.%s" $full $ns) (printf "%s.%s.svc" $full $ns) (printf "%s.%s" $full $domain) }}
{{- range $role := list "prefill" "decode" }}
{{- $headless := include "kvbridge.headlessName" (dict "root" $ "role" $role) }}
{{- $dns = concat $dns (list (printf "%s.%s" $headless $domain) (printf "*.%s.%s" $headless $domain) (printf "*.%s.%s.svc" $headless $ns)) }}
{{- end }}
{{- concat $dns .Values.auth.tls.extraDnsNames | uniq | toYaml }}
{{- end }}

{{/*
The generated credentials, base64 (YAML): tls.crt, tls.key, ca.crt when the chart makes
the certificate; token and side when it makes those. Existing Secrets are looked up and
kept; new values are made once per render and cached, so every template sees the same.
*/}}
{{- define "kvbridge.authData" -}}
{{- $cache := .Values }}
{{- if not (hasKey $cache "__kvbridgeAuthData") }}
{{- $ns := .Release.Namespace }}
{{- $out := dict }}
{{- if and .Values.auth.tls.create (not .Values.auth.tls.existingSecret) (not .Values.auth.tls.certManager.enabled) }}
{{- $old := lookup "v1" "Secret" $ns (include "kvbridge.tlsSecretName" .) }}
{{- if and $old $old.data (hasKey $old.data "tls.crt") (hasKey $old.data "tls.key") (hasKey $old.data "ca.crt") }}
{{- $out = pick $old.data "tls.crt" "tls.key" "ca.crt" }}
{{- else }}
{{- $full := include "kvbridge.fullname" . }}
{{- $days := int .Values.auth.tls.validityDays }}
{{- $ca := genCA (printf "%s-ca" $full) $days }}
{{- $cert := genSignedCert $full (list "127.0.0.1" "::1") (include "kvbridge.tlsDnsNames" . | fromYamlArray) $days $ca }}
{{- $out = dict "tls.crt" ($cert.Cert | b64enc) "tls.key" ($cert.Key | b64enc) "ca.crt" ($ca.Cert | b64enc) }}
{{- end }}
{{- end }}
{{- $old := lookup "v1" "Secret" $ns (include "kvbridge.generatedAuthSecretName" .) }}
{{- $oldData := default dict (and $old $old.data) }}
{{- if not .Values.auth.token.existingSecret }}
{{- $_ := set $out "token" (index $oldData .Values.auth.token.key | default (randAlphaNum 48 | b64enc)) }}
{{- end }}
{{- if not .Values.auth.sideSecret.existingSecret }}
{{- $_ := set $out "side" (index $oldData .Values.auth.sideSecret.key | default (randAlphaNum 64 | b64enc)) }}
{{- end }}
{{- $_ := set $cache "__kvbridgeAuthData" $out }}
{{- end }}
{{- index $cache "__kvbridgeAuthData" | toYaml }}
{{- end }}

{{/*
checksum/auth of the pods: what the chart knows of the credentials (generated values,
Secret names and keys, the Certificate's spec). A change rolls the pods; a renewal by
cert-manager or of an existing Secret does not (the daemons reload the certificate).
*/}}
{{- define "kvbridge.authChecksum" -}}
{{- $a := .Values.auth }}
{{- list (include "kvbridge.authData" .) $a.tls.existingSecret $a.tls.certManager (include "kvbridge.tlsDnsNames" .) $a.token $a.sideSecret | toJson | sha256sum }}
{{- end }}
