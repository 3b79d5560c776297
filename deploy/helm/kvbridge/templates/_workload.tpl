{{/*
The StatefulSet of one role: (dict "root" $ "role" "prefill" | "decode").
StatefulSets give each pod a stable DNS name under the role's headless Service,
which the decode daemons' --prefill flags and the certificate's names rely on.
*/}}
{{- define "kvbridge.workload" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := index $root.Values $role }}
{{- $ctx := dict "root" $root "role" $role }}
{{- $cfg := include "kvbridge.roleConfig" $ctx | fromYaml }}
{{- $insecure := $root.Values.auth.insecure }}
{{- $probeMode := include "kvbridge.probeMode" $root }}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "kvbridge.roleName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "kvbridge.roleLabels" $ctx | nindent 4 }}
spec:
  replicas: {{ $v.replicas }}
  serviceName: {{ include "kvbridge.headlessName" $ctx }}
  podManagementPolicy: Parallel
  updateStrategy:
    type: RollingUpdate
  selector:
    matchLabels:
      {{- include "kvbridge.roleSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "kvbridge.roleSelectorLabels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include "kvbridge.roleConfig" $ctx | sha256sum }}
        {{- if not $insecure }}
        checksum/auth: {{ include "kvbridge.authChecksum" $root }}
        {{- end }}
        {{- with $root.Values.rdma.networks }}
        {{- if $root.Values.rdma.enabled }}
        k8s.v1.cni.cncf.io/networks: {{ join "," . | quote }}
        {{- end }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "kvbridge.serviceAccountName" $root }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- if $root.Values.hostNetwork }}
      hostNetwork: true
      dnsPolicy: ClusterFirstWithHostNet
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $root.Values.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.nodeSelector $v.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $v.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $selector := dict "matchLabels" (include "kvbridge.roleSelectorLabels" $ctx | fromYaml) }}
      {{- $affinity := default $root.Values.affinity $v.affinity }}
      {{- if and (not $affinity) (ne $root.Values.podAntiAffinity "none") }}
      {{- /* pods of one role avoid sharing a node (soft) or never do (hard) */}}
      {{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" $selector }}
      {{- if eq $root.Values.podAntiAffinity "hard" }}
      {{- $affinity = dict "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
      {{- else }}
      {{- $affinity = dict "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
      {{- end }}
      {{- end }}
      {{- with $affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $spread := $v.topologySpreadConstraints }}
      {{- $ts := $root.Values.topologySpread }}
      {{- if and (not $spread) $ts.enabled }}
      {{- $spread = list (dict "maxSkew" (int $ts.maxSkew) "topologyKey" $ts.topologyKey "whenUnsatisfiable" "ScheduleAnyway" "labelSelector" $selector) }}
      {{- end }}
      {{- with $spread }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "kvbridge.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["kvbridge"]
          args:
            - {{ $role }}
            - --config=/etc/kvbridge/config/{{ $role }}.yaml
            - --host={{ $root.Values.bindHost }}
            - --grpc-port={{ $root.Values.ports.grpc }}
            - --side-port={{ $root.Values.ports.side }}
            - --metrics-port={{ $root.Values.ports.metrics }}
            {{- if $insecure }}
            - --insecure
            {{- else }}
            - --tls-cert=/etc/kvbridge/tls/tls.crt
            - --tls-key=/etc/kvbridge/tls/tls.key
            - --tls-ca=/etc/kvbridge/tls/ca.crt
            - --auth-token-file=/etc/kvbridge/auth/token
            - --side-secret-file=/etc/kvbridge/auth/side-secret
            {{- end }}
            {{- if eq $role "decode" }}
            - --http-port={{ $root.Values.ports.http }}
            {{- range (include "kvbridge.prefillTargets" $root | trim | splitList "\n") }}
            {{- if . }}
            - --prefill={{ . }}
            {{- end }}
            {{- end }}
            {{- end }}
            {{- range $v.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $root.Values.ports.grpc }}
              protocol: TCP
            - name: side
              containerPort: {{ $root.Values.ports.side }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $root.Values.ports.metrics }}
              protocol: TCP
            {{- if eq $role "decode" }}
            - name: http
              containerPort: {{ $root.Values.ports.http }}
              protocol: TCP
            {{- end }}
          env:
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: POD_NAMESPACE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.namespace
            # Address peers use for the side channel and the transfer engine
            # (the node's address under hostNetwork).
            - name: KVBRIDGE_ADVERTISE_HOST
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            # Writable homes for caches (Triton kernels) under the read-only root.
            - name: HOME
              value: /tmp
            - name: TRITON_CACHE_DIR
              value: /tmp/triton
            {{- $transportEnv := ternary $root.Values.mooncake.env $root.Values.ucx.env (eq $cfg.backend "mooncake") }}
            {{- range $name, $value := $transportEnv }}
            - name: {{ $name }}
              value: {{ $value | toString | quote }}
            {{- end }}
            {{- with $root.Values.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- $probeAuth := list }}
          {{- if not $insecure }}
          {{- $probeAuth = list "--tls-ca=/etc/kvbridge/tls/ca.crt" "--tls-cert=/etc/kvbridge/tls/tls.crt" "--tls-key=/etc/kvbridge/tls/tls.key" (printf "--tls-server-name=%s" $root.Values.probes.tlsServerName) "--auth-token-file=/etc/kvbridge/auth/token" }}
          {{- end }}
          {{- /* readiness: takes work (not draining; decode: a prefill answers);
                 startup and liveness: the process serves gRPC, also while draining */}}
          {{- $services := dict "startup" $root.Values.probes.livenessService "readiness" $root.Values.probes.service "liveness" $root.Values.probes.livenessService }}
          {{- range $kind := list "startup" "readiness" "liveness" }}
          {{- $service := index $services $kind }}
          {{ $kind }}Probe:
            {{- if eq $probeMode "grpc" }}
            grpc:
              port: {{ $root.Values.ports.grpc }}
              service: {{ $service | quote }}
            {{- else }}
            exec:
              command:
                {{- toYaml (concat (list "kvbridge-healthcheck" (printf "--target=127.0.0.1:%v" $root.Values.ports.grpc) (printf "--service=%s" $service) "--timeout=3") $probeAuth) | nindent 16 }}
            {{- end }}
            {{- toYaml (index $root.Values.probes $kind) | nindent 12 }}
          {{- end }}
          resources:
            {{- $res := deepCopy (default dict $v.resources) }}
            {{- $limits := default dict $res.limits }}
            {{- $requests := default dict $res.requests }}
            {{- if $root.Values.gpu.enabled }}
            {{- $_ := set $limits $root.Values.gpu.resourceName $root.Values.gpu.count }}
            {{- $_ := set $requests $root.Values.gpu.resourceName $root.Values.gpu.count }}
            {{- end }}
            {{- if $root.Values.rdma.enabled }}
            {{- $_ := set $limits $root.Values.rdma.resourceName $root.Values.rdma.count }}
            {{- $_ := set $requests $root.Values.rdma.resourceName $root.Values.rdma.count }}
            {{- end }}
            {{- $_ := set $res "limits" $limits }}
            {{- $_ := set $res "requests" $requests }}
            {{- toYaml $res | nindent 12 }}
          {{- $sc := deepCopy (default dict $root.Values.securityContext) }}
          {{- if $root.Values.rdma.enabled }}
          {{- $caps := default dict $sc.capabilities }}
          {{- $_ := set $caps "add" (append (default list $caps.add) "IPC_LOCK" | uniq) }}
          {{- $_ := set $sc "capabilities" $caps }}
          {{- end }}
          {{- with $sc }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: config
              mountPath: /etc/kvbridge/config
              readOnly: true
            {{- if not $insecure }}
            - name: tls
              mountPath: /etc/kvbridge/tls
              readOnly: true
            - name: auth
              mountPath: /etc/kvbridge/auth
              readOnly: true
            {{- end }}
            - name: shm
              mountPath: /dev/shm
            - name: tmp
              mountPath: /tmp
            {{- with $root.Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "kvbridge.fullname" $root }}-config
        {{- if not $insecure }}
        - name: tls
          secret:
            secretName: {{ include "kvbridge.tlsSecretName" $root }}
            defaultMode: 0440
            items:
              - {key: tls.crt, path: tls.crt}
              - {key: tls.key, path: tls.key}
              - {key: ca.crt, path: ca.crt}
        - name: auth
          projected:
            defaultMode: 0440
            sources:
              - secret:
                  name: {{ include "kvbridge.tokenSecretName" $root }}
                  items:
                    - {key: {{ $root.Values.auth.token.key }}, path: token}
              - secret:
                  name: {{ include "kvbridge.sideSecretName" $root }}
                  items:
                    - {key: {{ $root.Values.auth.sideSecret.key }}, path: side-secret}
        {{- end }}
        - name: shm
          emptyDir:
            medium: Memory
            {{- with $root.Values.shm.sizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        - name: tmp
          emptyDir: {}
        {{- with $root.Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}
