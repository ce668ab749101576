{{/*
Shared pieces. Templates return strings, so the values travel as YAML: every template that
an app chart may include starts with `include "sidecar.values" . | fromYaml`.
*/}}

{{/*
This chart's values, whether rendered by this chart (its own keys are there; its name may
be an alias) or included by an app chart that depends on it (alias "sidecar", or by name).
*/}}
{{- define "sidecar.values" -}}
{{- if and (hasKey .Values "healthPort") (hasKey .Values "nativeSidecar") -}}
{{- toYaml .Values -}}
{{- else if hasKey .Values "sidecar" -}}
{{- toYaml .Values.sidecar -}}
{{- else if hasKey .Values "transformers-sidecar" -}}
{{- toYaml (index .Values "transformers-sidecar") -}}
{{- else -}}
{{- fail "the sidecar templates need this chart's values: list transformers-sidecar under dependencies in your Chart.yaml (alias: sidecar)" -}}
{{- end -}}
{{- end -}}

{{/* "standalone" or "sidecar", for this chart's own templates. */}}
{{- define "sidecar.mode" -}}
{{- if eq .Values.mode "auto" -}}
{{- ternary "standalone" "sidecar" .Chart.IsRoot -}}
{{- else -}}
{{- .Values.mode -}}
{{- end -}}
{{- end -}}

{{- define "sidecar.fullname" -}}
{{- if contains "transformers-sidecar" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-transformers-sidecar" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sidecar.selectorLabels" -}}
app.kubernetes.io/name: transformers-sidecar
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sidecar.labels" -}}
{{ include "sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository@digest, else repository:tag (cudaTag on GPUs). Takes (dict "image" ... "cuda" bool). */}}
{{- define "sidecar.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (ternary .image.cudaTag .image.tag (and .cuda (hasKey .image "cudaTag"))) -}}
{{- end -}}
{{- end -}}

{{/* A number as an integer when it is whole: YAML round trips make 16777216 "1.6777216e+07". */}}
{{- define "sidecar.number" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* ONNX Runtime threads from the CPU request (else limit), rounded up, at least 1; empty when none. */}}
{{- define "sidecar.threads" -}}
{{- $resources := . | default dict -}}
{{- $cpu := toString (dig "requests" "cpu" (dig "limits" "cpu" "" $resources) $resources) -}}
{{- if hasSuffix "m" $cpu -}}
{{- max 1 (int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000))) -}}
{{- else if $cpu -}}
{{- max 1 (int (ceil (float64 $cpu))) -}}
{{- end -}}
{{- end -}}

{{/* Where a model dir is, inside the containers. Takes the model. */}}
{{- define "sidecar.modelPath" -}}
{{- if .path -}}
{{- .path -}}
{{- else if .export -}}
{{- printf "/srv/exports/%s" .name -}}
{{- else -}}
{{- printf "/srv/models/%s" .name -}}
{{- end -}}
{{- end -}}

{{/* The address the server listens on. Takes (dict "v" values "standalone" bool). */}}
{{- define "sidecar.listenAddress" -}}
{{- if .standalone -}}
{{- printf "0.0.0.0:%s" (include "sidecar.number" .v.port) -}}
{{- else if eq .v.transport "unix" -}}
{{- printf "unix:%s/%s" .v.socket.dir .v.socket.name -}}
{{- else -}}
{{- printf "127.0.0.1:%s" (include "sidecar.number" .v.port) -}}
{{- end -}}
{{- end -}}

{{/* Seconds of preStop sleep. Takes (dict "v" values "standalone" bool "native" bool). */}}
{{- define "sidecar.preStopSeconds" -}}
{{- if .standalone -}}
{{- include "sidecar.number" .v.shutdown.preStopSleepSeconds -}}
{{- else if .native -}}
0
{{- else -}}
{{- include "sidecar.number" .v.shutdown.appDrainSeconds -}}
{{- end -}}
{{- end -}}

{{/*
The pod's terminationGracePeriodSeconds: whatever runs before SIGTERM reaches the server
(preStop, or the app's drain), then the server's drain, then 5 s to flush traces and exit.
*/}}
{{- define "sidecar.gracePeriod" -}}
{{- $drain := ceil (float64 (dig "grace_period_s" 10 (.v.config | default dict))) -}}
{{- $before := ternary .v.shutdown.preStopSleepSeconds .v.shutdown.appDrainSeconds .standalone -}}
{{- add (int $before) (int $drain) 5 -}}
{{- end -}}

{{/* Checks that no value combination the schema cannot see is wrong. */}}
{{- define "sidecar.check" -}}
{{- $ports := list (include "sidecar.number" .v.healthPort) -}}
{{- if .v.metrics.enabled -}}{{- $ports = append $ports (include "sidecar.number" .v.metrics.port) -}}{{- end -}}
{{- if .v.http.enabled -}}{{- $ports = append $ports (include "sidecar.number" .v.http.port) -}}{{- end -}}
{{- if or .standalone (eq .v.transport "tcp") -}}{{- $ports = append $ports (include "sidecar.number" .v.port) -}}{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "port, healthPort, metrics.port and http.port must differ; got %s" (join ", " $ports)) -}}
{{- end -}}
{{- if .standalone -}}
{{- $service := list (include "sidecar.number" .v.service.port) (include "sidecar.number" .v.healthPort) -}}
{{- if .v.metrics.enabled -}}{{- $service = append $service (include "sidecar.number" .v.metrics.port) -}}{{- end -}}
{{- if .v.http.enabled -}}{{- $service = append $service (include "sidecar.number" .v.http.port) -}}{{- end -}}
{{- if ne (len $service) (len (uniq $service)) -}}
{{- fail (printf "service.port, healthPort, metrics.port and http.port must differ; got %s" (join ", " $service)) -}}
{{- end -}}
{{- if and .v.service.headless (ne .v.service.type "ClusterIP") -}}
{{- fail (printf "service.headless needs service.type ClusterIP, not %s" .v.service.type) -}}
{{- end -}}
{{- if and .v.autoscaling.enabled (gt (int .v.autoscaling.minReplicas) (int .v.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas %v is above maxReplicas %v" .v.autoscaling.minReplicas .v.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- if eq .v.transport "unix" -}}
{{- $socket := printf "%s/%s" .v.socket.dir .v.socket.name -}}
{{- if gt (len $socket) 107 -}}
{{- fail (printf "socket path %s is %d bytes; Unix sockets allow 107" $socket (len $socket)) -}}
{{- end -}}
{{- if eq (clean .v.socket.dir) "/tmp" -}}
{{- fail "socket.dir must not be /tmp (the sidecar's scratch volume is mounted there)" -}}
{{- end -}}
{{- end -}}
{{- /* The server refuses these at start: say so at render time, with its defaults. */ -}}
{{- $config := .v.config | default dict -}}
{{- $queue := dig "max_queue_size" 1024 $config | int64 -}}
{{- range $key, $default := dict "max_client_batch_size" 64 "max_rerank_passages" 128 -}}
{{- $wanted := dig $key $default $config | int64 -}}
{{- if lt $queue $wanted -}}
{{- fail (printf "config.max_queue_size %d is below config.%s %d: a full call could never be queued, and the server refuses to start" $queue $key $wanted) -}}
{{- end -}}
{{- end -}}
{{- $tls := .v.tls -}}
{{- if and $tls.enabled (not $tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key (cert-manager's Certificate writes one)" -}}
{{- end -}}
{{- if not $tls.enabled -}}
{{- $set := list -}}
{{- range $key := list "secretName" "clientAuth" "clientCASecretName" -}}
{{- if get $tls $key -}}{{- $set = append $set (printf "tls.%s" $key) -}}{{- end -}}
{{- end -}}
{{- if $set -}}
{{- fail (printf "%s set but tls.enabled is false, so the API port would serve plain text: set tls.enabled=true, or remove them" (join ", " $set)) -}}
{{- end -}}
{{- end -}}
{{- if and $tls.clientCASecretName (not $tls.clientAuth) -}}
{{- fail "tls.clientCASecretName is set but tls.clientAuth is false: set tls.clientAuth=true to require client certificates, or remove it" -}}
{{- end -}}
{{- if and (not .v.auth.tokenSecret.name) (ne (.v.auth.tokenSecret.key | default "token") "token") -}}
{{- fail "auth.tokenSecret.key is set but auth.tokenSecret.name is not: name the Secret that holds the token" -}}
{{- end -}}
{{- if and .standalone (eq .v.transport "unix") -}}
{{- fail "transport: unix works in sidecar mode only (a socket is reachable from the same pod); standalone mode listens on tcp" -}}
{{- end -}}
{{- $names := list -}}
{{- range $model := .v.models -}}
{{- $names = append $names $model.name -}}
{{- $sources := list -}}
{{- range $source := list "path" "export" "pvc" "image" -}}
{{- if get $model $source -}}{{- $sources = append $sources $source -}}{{- end -}}
{{- end -}}
{{- if ne (len $sources) 1 -}}
{{- fail (printf "model %s: give exactly one of path, export, pvc, image; got %s" $model.name (join ", " $sources | default "none")) -}}
{{- end -}}
{{- end -}}
{{- if ne (len $names) (len (uniq $names)) -}}
{{- fail (printf "model names must be unique; got %s" (join ", " $names)) -}}
{{- end -}}
{{- if and .v.defaultModel (not (has .v.defaultModel $names)) -}}
{{- fail (printf "defaultModel %q is not one of the models: %s" .v.defaultModel (join ", " $names)) -}}
{{- end -}}
{{- end -}}
