{{/*
The templates an app chart includes to run the sidecar in its own pod (README, "Kubernetes"):

  initContainers:
    {{- include "sidecar.initContainers" . | nindent 8 }}
  containers:
    - name: app
      env:
        {{- include "sidecar.appEnv" . | nindent 12 }}
      volumeMounts:
        {{- include "sidecar.appVolumeMounts" . | nindent 12 }}
    {{- include "sidecar.container" . | nindent 8 }}
  volumes:
    {{- include "sidecar.volumes" . | nindent 8 }}

With nativeSidecar (the default) the server is an init container with restartPolicy Always
and "sidecar.container" renders nothing; otherwise it is a regular container and
"sidecar.initContainers" holds only the export steps. Pod-level helpers: "sidecar.podAnnotations",
"sidecar.nodeSelector", "sidecar.tolerations", "sidecar.terminationGracePeriodSeconds".
*/}}

{{- define "sidecar.initContainers" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- include "sidecar.exportContainers" $v -}}
{{- if $v.nativeSidecar }}
{{ include "sidecar.server" (dict "v" $v "standalone" false "native" true) }}
{{- end -}}
{{- end -}}

{{- define "sidecar.container" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- if not $v.nativeSidecar -}}
{{ include "sidecar.server" (dict "v" $v "standalone" false "native" false) }}
{{- end -}}
{{- end -}}

{{- define "sidecar.volumes" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- include "sidecar.podVolumes" (dict "v" $v "standalone" false) -}}
{{- end -}}

{{/* Tells the app container where the sidecar listens. */}}
{{- define "sidecar.appEnv" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
- name: TRANSFORMERS_SIDECAR_ADDRESS
  value: {{ include "sidecar.listenAddress" (dict "v" $v "standalone" false) | quote }}
{{- end -}}

{{/* The socket's volume, for the app container (nothing over tcp). */}}
{{- define "sidecar.appVolumeMounts" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- if eq $v.transport "unix" -}}
- name: sidecar-socket
  mountPath: {{ $v.socket.dir | quote }}
{{- end -}}
{{- end -}}

{{- define "sidecar.podAnnotations" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- if and $v.metrics.enabled $v.metrics.scrapeAnnotations (not $v.metrics.monitor.enabled) -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "sidecar.number" $v.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}

{{/* GPU nodes, when device is cuda (empty otherwise). */}}
{{- define "sidecar.nodeSelector" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- if eq $v.device "cuda" -}}
{{- with $v.gpu.nodeSelector }}{{ toYaml . }}{{ end -}}
{{- end -}}
{{- end -}}

{{- define "sidecar.tolerations" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- if eq $v.device "cuda" -}}
{{- with $v.gpu.tolerations }}{{ toYaml . }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* The least terminationGracePeriodSeconds the pod needs: the app's drain, then the sidecar's. */}}
{{- define "sidecar.terminationGracePeriodSeconds" -}}
{{- $v := include "sidecar.values" . | fromYaml -}}
{{- include "sidecar.gracePeriod" (dict "v" $v "standalone" false) -}}
{{- end -}}

{{/* One init container per model with an `export` source. Takes the values. */}}
{{- define "sidecar.exportContainers" -}}
{{- $v := . -}}
{{- range $model := $v.models }}
{{- with $model.export }}
- name: {{ printf "export-%s" $model.name | trunc 63 }}
  image: {{ include "sidecar.imageRef" (dict "image" $v.exportImage "cuda" false) }}
  imagePullPolicy: {{ $v.exportImage.pullPolicy }}
  args:
    - {{ .checkpoint | quote }}
    - {{ include "sidecar.modelPath" $model }}
    - --name={{ $model.name }}
    # An earlier attempt of this pod may have left a partial dir.
    - --force
    {{- with .revision }}
    - {{ printf "--revision=%s" . | quote }}
    {{- end }}
    {{- with .task }}
    - --task={{ . }}
    {{- end }}
    {{- with .backend }}
    - --backend={{ . }}
    {{- end }}
    {{- with .quantize }}
    - --quantize={{ . }}
    {{- end }}
    {{- with .maxLength }}
    - --max-length={{ include "sidecar.number" . }}
    {{- end }}
    {{- range .extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/huggingface
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- with .tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .name | quote }}
          key: {{ .key | default "token" | quote }}
    {{- end }}
  resources:
    {{- toYaml $v.export.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidecar-exports
      mountPath: /srv/exports
    - name: sidecar-export-tmp
      mountPath: /tmp
{{- end }}
{{- end }}
{{- end -}}

{{/*
The server container. Takes (dict "v" values "standalone" bool "native" bool): standalone
listens on the pod IP; a native sidecar is an init container that restarts Always.
*/}}
{{- define "sidecar.server" -}}
{{- $v := .v -}}
{{- include "sidecar.check" . -}}
{{- $config := $v.config | default dict -}}
{{- $cuda := eq $v.device "cuda" -}}
- name: transformers-sidecar
  image: {{ include "sidecar.imageRef" (dict "image" $v.image "cuda" $cuda) }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .native }}
  restartPolicy: Always
  {{- end }}
  ports:
    {{- if .standalone }}
    - name: sidecar-grpc
      containerPort: {{ include "sidecar.number" $v.port }}
      protocol: TCP
    {{- end }}
    - name: sidecar-health
      containerPort: {{ include "sidecar.number" $v.healthPort }}
      protocol: TCP
    {{- if and .standalone $v.http.enabled }}
    - name: sidecar-http
      containerPort: {{ include "sidecar.number" $v.http.port }}
      protocol: TCP
    {{- end }}
    {{- if $v.metrics.enabled }}
    - name: sidecar-metrics
      containerPort: {{ include "sidecar.number" $v.metrics.port }}
      protocol: TCP
    {{- end }}
  env:
    # Downward API first: the OTEL_* values below refer to these.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: HOST_IP
      valueFrom:
        fieldRef:
          fieldPath: status.hostIP
    - name: SIDECAR_ADDRESS
      value: {{ include "sidecar.listenAddress" . | quote }}
    - name: SIDECAR_HEALTH_ADDRESS
      value: {{ printf "0.0.0.0:%s" (include "sidecar.number" $v.healthPort) | quote }}
    - name: SIDECAR_HTTP_ADDRESS
      value: {{ ternary (printf "%s:%s" (ternary "0.0.0.0" "127.0.0.1" .standalone) (include "sidecar.number" $v.http.port)) "" $v.http.enabled | quote }}
    - name: SIDECAR_METRICS_ADDRESS
      value: {{ ternary (printf "0.0.0.0:%s" (include "sidecar.number" $v.metrics.port)) "" $v.metrics.enabled | quote }}
    - name: SIDECAR_MODELS
      value: {{ include "sidecar.modelsEnv" $v | quote }}
    {{- with $v.defaultModel }}
    - name: SIDECAR_DEFAULT_MODEL
      value: {{ . | quote }}
    {{- end }}
    - name: SIDECAR_DEVICE
      value: {{ $v.device | quote }}
    {{- if and (not (hasKey $config "intra_op_threads")) (include "sidecar.threads" $v.resources) }}
    - name: SIDECAR_INTRA_OP_THREADS
      value: {{ include "sidecar.threads" $v.resources | quote }}
    {{- end }}
    {{- if and .standalone (not (hasKey $config "max_connection_age_s")) }}
    # Clients move to new connections now and then, so added replicas get traffic.
    - name: SIDECAR_MAX_CONNECTION_AGE_S
      value: "300"
    {{- end }}
    {{- if $v.tls.enabled }}
    # TLS on the API port only; the files are mounted from the Secret(s) below.
    - name: SIDECAR_TLS_CERT_FILE
      value: /etc/transformers-sidecar/tls/tls.crt
    - name: SIDECAR_TLS_KEY_FILE
      value: /etc/transformers-sidecar/tls/tls.key
    {{- if $v.tls.clientAuth }}
    - name: SIDECAR_TLS_CLIENT_CA_FILE
      value: {{ ternary "/etc/transformers-sidecar/client-ca/ca.crt" "/etc/transformers-sidecar/tls/ca.crt" (not (empty $v.tls.clientCASecretName)) }}
    {{- end }}
    {{- end }}
    {{- if $v.auth.tokenSecret.name }}
    - name: SIDECAR_AUTH_TOKEN_FILE
      value: /etc/transformers-sidecar/auth/token
    {{- end }}
    {{- range $key, $value := $config }}
    - name: {{ printf "SIDECAR_%s" (upper $key) }}
      value: {{ include "sidecar.number" $value | quote }}
    {{- end }}
    - name: HF_HUB_OFFLINE
      value: "1"
    - name: HOME
      value: /tmp
    {{- with $v.otel }}
    {{- with .endpoint }}
    # Tracing is on once an endpoint is set (or OTEL_TRACES_EXPORTER in extraEnv).
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    - name: OTEL_SERVICE_NAME
      value: {{ .serviceName | default "transformers-sidecar" | quote }}
    - name: OTEL_TRACES_SAMPLER
      value: {{ .sampler | quote }}
    {{- with .samplerArg }}
    - name: OTEL_TRACES_SAMPLER_ARG
      value: {{ include "sidecar.number" . | quote }}
    {{- end }}
    {{- $attributes := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.node.name=$(NODE_NAME)" "k8s.container.name=transformers-sidecar" }}
    {{- range $key, $value := .resourceAttributes }}
    {{- $attributes = append $attributes (printf "%s=%s" $key $value) }}
    {{- end }}
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: {{ join "," $attributes | quote }}
    {{- range $key, $value := .extraEnv }}
    - name: {{ $key }}
      value: {{ include "sidecar.number" $value | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # The kubelet's own gRPC probes, on the health listener: "" and sidecar.v1.Inference are
  # SERVING once the models are loaded and until the drain starts; "liveness" as long as
  # the process answers, so a busy load or drain never gets the container restarted.
  startupProbe:
    grpc:
      port: {{ include "sidecar.number" $v.healthPort }}
      service: ""
    {{- toYaml $v.probes.startup | nindent 4 }}
  readinessProbe:
    grpc:
      port: {{ include "sidecar.number" $v.healthPort }}
      service: sidecar.v1.Inference
    {{- toYaml $v.probes.readiness | nindent 4 }}
  livenessProbe:
    grpc:
      port: {{ include "sidecar.number" $v.healthPort }}
      service: liveness
    {{- toYaml $v.probes.liveness | nindent 4 }}
  {{- $sleep := include "sidecar.preStopSeconds" . | int }}
  {{- if gt $sleep 0 }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ $sleep }}
  {{- end }}
  resources:
    {{- $resources := deepCopy ($v.resources | default dict) }}
    {{- if $cuda }}
    {{- $limits := merge (deepCopy ($resources.limits | default dict)) (dict $v.gpu.resource (include "sidecar.number" $v.gpu.count | int)) }}
    {{- $_ := set $resources "limits" $limits }}
    {{- end }}
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidecar-tmp
      mountPath: /tmp
    {{- if and (not .standalone) (eq $v.transport "unix") }}
    - name: sidecar-socket
      mountPath: {{ $v.socket.dir | quote }}
    {{- end }}
    {{- if include "sidecar.exportsAny" $v }}
    - name: sidecar-exports
      mountPath: /srv/exports
      readOnly: true
    {{- end }}
    {{- if $v.tls.enabled }}
    - name: sidecar-tls
      mountPath: /etc/transformers-sidecar/tls
      readOnly: true
    {{- if and $v.tls.clientAuth $v.tls.clientCASecretName }}
    - name: sidecar-client-ca
      mountPath: /etc/transformers-sidecar/client-ca
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if $v.auth.tokenSecret.name }}
    - name: sidecar-auth
      mountPath: /etc/transformers-sidecar/auth
      readOnly: true
    {{- end }}
    {{- range $v.models }}
    {{- if or .pvc .image }}
    - name: {{ printf "sidecar-model-%s" .name | trunc 63 }}
      mountPath: {{ include "sidecar.modelPath" . | quote }}
      readOnly: true
      {{- with .pvc }}{{ with .subPath }}
      subPath: {{ . | quote }}
      {{- end }}{{ end }}
    {{- end }}
    {{- end }}
{{- end -}}

{{/* name=path,... for SIDECAR_MODELS. Takes the values. */}}
{{- define "sidecar.modelsEnv" -}}
{{- $specs := list -}}
{{- range .models -}}
{{- $specs = append $specs (printf "%s=%s" .name (include "sidecar.modelPath" .)) -}}
{{- end -}}
{{- join "," $specs -}}
{{- end -}}

{{/* "true" when some model is exported by an init container. Takes the values. */}}
{{- define "sidecar.exportsAny" -}}
{{- range .models -}}{{- if .export -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/* The pod's volumes for the sidecar. Takes (dict "v" values "standalone" bool). */}}
{{- define "sidecar.podVolumes" -}}
{{- $v := .v -}}
- name: sidecar-tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if and (not .standalone) (eq $v.transport "unix") }}
- name: sidecar-socket
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- if include "sidecar.exportsAny" $v }}
- name: sidecar-exports
  emptyDir:
    sizeLimit: {{ $v.export.modelsSizeLimit }}
- name: sidecar-export-tmp
  emptyDir:
    sizeLimit: {{ $v.export.tmpSizeLimit }}
{{- end }}
{{- /* Secrets as read-only files (0444: no one writes them; the server runs as its own uid,
whatever the pod's fsGroup). A key missing from a Secret stops the pod with an event that
names it. */ -}}
{{- if $v.tls.enabled }}
- name: sidecar-tls
  secret:
    secretName: {{ $v.tls.secretName | quote }}
    defaultMode: 292
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- if and $v.tls.clientAuth (not $v.tls.clientCASecretName) }}
      - key: ca.crt
        path: ca.crt
      {{- end }}
{{- if and $v.tls.clientAuth $v.tls.clientCASecretName }}
- name: sidecar-client-ca
  secret:
    secretName: {{ $v.tls.clientCASecretName | quote }}
    defaultMode: 292
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}
{{- with $v.auth.tokenSecret }}{{ if .name }}
- name: sidecar-auth
  secret:
    secretName: {{ .name | quote }}
    defaultMode: 292
    items:
      - key: {{ .key | default "token" | quote }}
        path: token
{{- end }}{{ end }}
{{- range $v.models }}
{{- if .pvc }}
- name: {{ printf "sidecar-model-%s" .name | trunc 63 }}
  persistentVolumeClaim:
    claimName: {{ .pvc.claimName | quote }}
    readOnly: true
{{- else if .image }}
- name: {{ printf "sidecar-model-%s" .name | trunc 63 }}
  image:
    reference: {{ .image.reference | quote }}
    pullPolicy: {{ .image.pullPolicy | default "IfNotPresent" }}
{{- end }}
{{- end }}
{{- end -}}
