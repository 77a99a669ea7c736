{{/* Names and labels shared by every template. */}}
{{- define "echo.name" -}}{{ .Release.Name }}{{- end -}}

{{- define "echo.labels" -}}
app.kubernetes.io/name: echo
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The environment every Echo container gets: where the others are, and the shared engines. */}}
{{- define "echo.env" -}}
- {name: ECHO__DATA_DIR, value: /data}
- {name: ECHO__BIND, value: "0.0.0.0"}
- {name: ECHO__LOG__FORMAT, value: json}
- {name: ECHO__ISSUER, value: {{ .Values.issuer | quote }}}
- {name: ECHO__PUBLIC_URL, value: {{ .Values.publicUrl | quote }}}
- {name: ECHO__QUEUE__URL, value: {{ .Values.queueUrl | quote }}}
- {name: ECHO__STORAGE__URL, value: {{ .Values.storage.url | quote }}}
- {name: ECHO__STORAGE__S3_ENDPOINT, value: {{ .Values.storage.endpoint | quote }}}
- {name: ECHO__STORAGE__S3_REGION, value: {{ .Values.storage.region | quote }}}
- name: ECHO__DATABASE__URL
  valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: database-url}}
- name: ECHO__STORAGE__S3_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: s3-access-key-id}}
- name: ECHO__STORAGE__S3_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: s3-secret-access-key}}
- name: ECHO__METRICS_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .Values.existingSecret }}, key: metrics-token}}
{{- range $name, $svc := .Values.services }}
{{- if ne $name "ingest-worker" }}
- {name: ECHO__URLS__{{ upper $name }}, value: "http://{{ include "echo.name" $ }}-{{ $name }}:{{ $svc.port }}"}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
