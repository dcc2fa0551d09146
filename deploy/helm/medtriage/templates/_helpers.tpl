{{/* Names and labels. */}}
{{- define "medtriage.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medtriage.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "api") */}}
{{- define "medtriage.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "medtriage.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* A custom resource kind renders when its CRD is installed ("auto"), or when forced. */}}
{{- define "medtriage.keda" -}}
{{- $mode := .Values.crds.keda -}}
{{- if or (eq (toString $mode) "true") (and (eq (toString $mode) "auto") (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject")) -}}true{{- end -}}
{{- end -}}
{{- define "medtriage.prometheusOperator" -}}
{{- $mode := .Values.crds.prometheusOperator -}}
{{- if or (eq (toString $mode) "true") (and (eq (toString $mode) "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) -}}true{{- end -}}
{{- end -}}

{{/* Restricted pod security: non-root, no privilege escalation, no capabilities, read-only root. */}}
{{- define "medtriage.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "medtriage.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/*
Environment of the API, workers and DIMSE receiver. They connect to PostgreSQL as the
least-privilege role medtriage_app (migrations run as the owner in the hook Job only).
*/}}
{{- define "medtriage.appEnv" -}}
- name: MEDTRIAGE_DEPLOYMENT
  value: production
- name: MEDTRIAGE_HOME
  value: /var/lib/medtriage
- name: MEDTRIAGE_QUEUE_PREFIX
  value: {{ .Values.queuePrefix | quote }}
- name: MEDTRIAGE_APP_DB_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.postgres.existingSecret | quote }}, key: {{ .Values.postgres.appPasswordKey | quote }}}
- name: MEDTRIAGE_DATABASE_URL
  value: {{ include "medtriage.databaseUrl" (dict "ctx" . "user" "medtriage_app" "password" "MEDTRIAGE_APP_DB_PASSWORD") | quote }}
{{ include "medtriage.redisEnv" . }}
{{ include "medtriage.storageEnv" . }}
- name: MEDTRIAGE_TRITON_GRPC_URL
  value: {{ printf "%s-triton:8001" (include "medtriage.fullname" .) | quote }}
- name: MEDTRIAGE_TRITON_HTTP_URL
  value: {{ printf "http://%s-triton:8000" (include "medtriage.fullname" .) | quote }}
- name: MEDTRIAGE_MODEL_REPOSITORY
  value: /models
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* postgresql://USER:$(PASSWORD_ENV)@host:port/db?sslmode=...: the kubelet expands $(VAR). */}}
{{- define "medtriage.databaseUrl" -}}
{{- $pg := .ctx.Values.postgres -}}
{{- $query := printf "sslmode=%s" $pg.sslmode -}}
{{- if $pg.caSecret -}}{{- $query = printf "%s&sslrootcert=/run/secrets/medtriage/postgres-ca/ca.crt" $query -}}{{- end -}}
{{- printf "postgresql://%s:$(%s)@%s:%d/%s?%s" .user .password $pg.host (int $pg.port) $pg.database $query -}}
{{- end -}}

{{- define "medtriage.redisEnv" -}}
{{- $r := .Values.redis -}}
{{- if $r.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $r.existingSecret | quote }}, key: {{ $r.passwordKey | quote }}}
- name: MEDTRIAGE_REDIS_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s:%d/0" (ternary "rediss" "redis" $r.tls) $r.host (int $r.port) | quote }}
{{- else }}
- name: MEDTRIAGE_REDIS_URL
  value: {{ printf "%s://%s:%d/0" (ternary "rediss" "redis" $r.tls) $r.host (int $r.port) | quote }}
{{- end }}
{{- end -}}

{{- define "medtriage.storageEnv" -}}
{{- $s := .Values.storage -}}
- name: MEDTRIAGE_STORAGE_URL
  value: {{ $s.url | quote }}
- name: MEDTRIAGE_S3_REGION
  value: {{ $s.region | quote }}
{{- if $s.endpointUrl }}
- name: MEDTRIAGE_S3_ENDPOINT_URL
  value: {{ $s.endpointUrl | quote }}
{{- end }}
- name: MEDTRIAGE_STORAGE_ENCRYPTION_KEYS_FILE
  value: /run/secrets/medtriage/storage-keys/{{ $s.encryptionKeysKey }}
{{ include "medtriage.s3Credentials" . }}
{{- end -}}

{{- define "medtriage.s3Credentials" -}}
{{- if .Values.storage.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.storage.existingSecret | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.storage.existingSecret | quote }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.storage.region | quote }}
{{- end -}}

{{/* Volumes every app pod mounts: scratch (read-only root), the storage keys, the model
repository, the PostgreSQL CA. */}}
{{- define "medtriage.appVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: storage-keys
  secret:
    secretName: {{ .Values.storage.encryptionKeysSecret | quote }}
    defaultMode: 0400
{{- if .Values.postgres.caSecret }}
- name: postgres-ca
  secret:
    secretName: {{ .Values.postgres.caSecret | quote }}
{{- end }}
{{ include "medtriage.modelVolume" . }}
{{- end -}}

{{- define "medtriage.modelVolume" -}}
- name: models
{{- if .Values.triton.modelRepository.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.triton.modelRepository.existingClaim | quote }}
    readOnly: true
{{- else }}
  emptyDir: {}
- name: fetch-models
  configMap:
    name: {{ include "medtriage.fullname" . }}-scripts
{{- end }}
{{- end -}}

{{- define "medtriage.appMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /var/lib/medtriage}
- {name: storage-keys, mountPath: /run/secrets/medtriage/storage-keys, readOnly: true}
- {name: models, mountPath: /models, readOnly: true}
{{- if .Values.postgres.caSecret }}
- {name: postgres-ca, mountPath: /run/secrets/medtriage/postgres-ca, readOnly: true}
{{- end }}
{{- end -}}

{{/* With an s3:// model repository, an init container copies it to /models (the API and
workers read config.pbtxt, rules and gate files from the same versions Triton serves). */}}
{{- define "medtriage.fetchModels" -}}
{{- if not .Values.triton.modelRepository.existingClaim }}
- name: fetch-models
  image: {{ include "medtriage.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "/scripts/fetch_model_repository.py", {{ .Values.triton.modelRepository.url | quote }}, "/models"]
  env:
{{ include "medtriage.s3Credentials" . | indent 4 }}
{{- if .Values.storage.endpointUrl }}
    - name: MEDTRIAGE_S3_ENDPOINT_URL
      value: {{ .Values.storage.endpointUrl | quote }}
{{- end }}
  securityContext:
{{ include "medtriage.containerSecurity" . | indent 4 }}
  volumeMounts:
    - {name: models, mountPath: /models}
    - {name: fetch-models, mountPath: /scripts, readOnly: true}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}
