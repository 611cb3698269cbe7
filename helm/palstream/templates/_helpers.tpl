{{/*
Shared names, labels and pod fragments. Runner, scheduler and workers are built from the
same fragments in both modes (operator and plain), so the two cannot drift apart.
*/}}

{{/* Release-scoped name; also the DaskJob/DaskCluster name, so the operator's
scheduler Service is "<fullname>-scheduler". Kept short: the operator appends suffixes. */}}
{{- define "palstream.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "palstream.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "palstream.labels" -}}
{{ include "palstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of one component's pods: the dask.org/* labels are the ones the operator
sets, so the scheduler Service selector and the PodMonitor work the same in both modes. */}}
{{- define "palstream.componentLabels" -}}
{{ include "palstream.labels" .root }}
app.kubernetes.io/component: {{ .component }}
dask.org/cluster-name: {{ include "palstream.fullname" .root }}
dask.org/component: {{ .component }}
{{- end -}}

{{- define "palstream.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) | quote }}
{{- end -}}

{{- define "palstream.schedulerService" -}}
{{ include "palstream.fullname" . }}-scheduler
{{- end -}}

{{/* Scheduler address for plain mode; the operator injects the same variable itself. */}}
{{- define "palstream.schedulerAddress" -}}
tcp://{{ include "palstream.schedulerService" . }}.{{ .Release.Namespace }}.svc.cluster.local:8786
{{- end -}}

{{/* Fail early, with one line naming the value and the fix, on values that cannot work. */}}
{{- define "palstream.validate" -}}
{{- if not (trim .Values.job.spec) -}}
{{- fail "job.spec is empty: pass the job TOML with --set-file job.spec=jobs/<job>.toml" -}}
{{- end -}}
{{- $storage := .Values.storage.type -}}
{{- if not $storage -}}
{{- fail "storage.type is required: set it to s3, pvc or hostPath" -}}
{{- end -}}
{{- if and (eq $storage "s3") (not .Values.storage.s3.secretName) -}}
{{- fail "storage.s3.secretName is required for S3 storage: create a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it here" -}}
{{- end -}}
{{- if and (eq $storage "hostPath") (not (hasPrefix "/" .Values.storage.hostPath.path)) -}}
{{- fail "storage.hostPath.path must be an absolute path on the node (e.g. /mnt/nvme/palstream) for hostPath storage" -}}
{{- end -}}
{{- $gpu := .Values.workers.gpu -}}
{{- if and $gpu.enabled (ne (int $gpu.gpus) 1) -}}
{{- fail (printf "workers.gpu.gpus is %v: GPU workers need exactly 1 GPU per pod (one dask-cuda worker per GPU); scale with workers.gpu.replicas" $gpu.gpus) -}}
{{- end -}}
{{- if and $gpu.enabled (lt (int $gpu.replicas) 1) -}}
{{- fail "workers.gpu.replicas is 0 with GPU workers enabled: set it to the number of GPUs to use, or set workers.gpu.enabled=false" -}}
{{- end -}}
{{- if and (lt (int .Values.workers.cpu.replicas) 1) (not $gpu.enabled) -}}
{{- fail "no workers: set workers.cpu.replicas >= 1 or enable GPU workers (workers.gpu.enabled=true)" -}}
{{- end -}}
{{- $autoscale := .Values.workers.cpu.autoscale -}}
{{- if and $autoscale.enabled (not .Values.operator) -}}
{{- fail "workers.cpu.autoscale needs the dask-kubernetes operator (operator=true); without it, scale the worker Deployment by hand" -}}
{{- end -}}
{{- if and $autoscale.enabled (gt (int $autoscale.minimum) (int $autoscale.maximum)) -}}
{{- fail (printf "workers.cpu.autoscale.minimum (%v) is above its maximum (%v)" $autoscale.minimum $autoscale.maximum) -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by runner and workers: writable paths under /tmp (the root
filesystem is read-only) and storage credentials, always by Secret reference. */}}
{{- define "palstream.env" -}}
- name: HOME
  value: /tmp
- name: DASK_TEMPORARY_DIRECTORY
  value: /tmp/dask
# The codec's kernels as compiled into the image (Dockerfile); palstream copies them to /tmp
# at first use, since numba needs a writable cache.
- name: NUMBA_CACHE_DIR
  value: /opt/palstream/numba-cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
# Worker processes: glibc malloc settings that keep the codec off mmap page faults (~15 % of a
# unit's time with Dask's default MALLOC_TRIM_THRESHOLD_); see WORKER_MALLOC in palstream/batch/cluster.py.
- name: DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON
  value: '{"MALLOC_TRIM_THRESHOLD_": 1073741824, "MALLOC_MMAP_THRESHOLD_": 33554432}'
{{- if eq .Values.storage.type "s3" }}
{{- with .Values.storage.s3 }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "palstream.volumeMounts" -}}
- name: scratch
  mountPath: /tmp
{{- if ne .Values.storage.type "s3" }}
- name: data
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
{{- end -}}

{{- define "palstream.volumes" -}}
- name: scratch
  emptyDir:
    sizeLimit: {{ .Values.scratchSizeLimit }}
{{- if eq .Values.storage.type "pvc" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "palstream.fullname" .)) .Values.storage.pvc.claimName }}
{{- else if eq .Values.storage.type "hostPath" }}
- name: data
  hostPath:
    path: {{ .Values.storage.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{/* Pod-level fields common to every pod. */}}
{{- define "palstream.podCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The runner container: the same `palstream submit` a user runs locally, on the
mounted spec, pointed at this release's scheduler. */}}
{{- define "palstream.runnerContainer" -}}
name: runner
image: {{ include "palstream.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command:
  - palstream
  - submit
  - /etc/palstream/job.toml
  - --cluster
  - $(DASK_SCHEDULER_ADDRESS)
  - --metrics-host
  - 0.0.0.0
  - --metrics-port
  - {{ .Values.job.metricsPort | quote }}
  # Pod logs are no terminal: a progress bar would only add noise; see `palstream status`.
  - --no-progress
  {{- if .Values.workers.cpu.autoscale.enabled }}
  # Enough tasks in flight for the scheduler to see a backlog to scale on.
  - --max-in-flight
  - {{ mul .Values.workers.cpu.autoscale.maximum .Values.workers.cpu.nthreads | quote }}
  {{- end }}
  {{- range .Values.job.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  {{- include "palstream.env" . | nindent 2 }}
  {{- if not .Values.operator }}
  - name: DASK_SCHEDULER_ADDRESS
    value: {{ include "palstream.schedulerAddress" . }}
  {{- end }}
  {{- with .Values.job.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: metrics
    containerPort: {{ .Values.job.metricsPort }}
    protocol: TCP
resources:
  {{- toYaml .Values.job.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  {{- include "palstream.volumeMounts" . | nindent 2 }}
  - name: job-spec
    mountPath: /etc/palstream
    readOnly: true
{{- end -}}

{{- define "palstream.runnerVolumes" -}}
{{ include "palstream.volumes" . }}
- name: job-spec
  configMap:
    name: {{ include "palstream.fullname" . }}-job
{{- end -}}

{{- define "palstream.schedulerContainer" -}}
name: scheduler
image: {{ include "palstream.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command:
  - dask
  - scheduler
  - --port
  - "8786"
  - --dashboard-address
  - ":8787"
env:
  - name: HOME
    value: /tmp
  - name: DASK_TEMPORARY_DIRECTORY
    value: /tmp/dask
ports:
  - name: tcp-comm
    containerPort: 8786
    protocol: TCP
  - name: http-dashboard
    containerPort: 8787
    protocol: TCP
readinessProbe:
  httpGet:
    port: http-dashboard
    path: /health
  initialDelaySeconds: 5
  periodSeconds: 10
livenessProbe:
  httpGet:
    port: http-dashboard
    path: /health
  initialDelaySeconds: 15
  periodSeconds: 20
resources:
  {{- toYaml .Values.scheduler.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: scratch
    mountPath: /tmp
{{- end -}}

{{- define "palstream.schedulerPodSpec" -}}
{{ include "palstream.podCommon" . }}
containers:
  - {{ include "palstream.schedulerContainer" . | nindent 4 | trim }}
volumes:
  - name: scratch
    emptyDir:
      sizeLimit: {{ .Values.scratchSizeLimit }}
{{- with .Values.scheduler.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.scheduler.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "palstream.schedulerServiceSpec" -}}
type: ClusterIP
selector:
  dask.org/cluster-name: {{ include "palstream.fullname" . }}
  dask.org/component: scheduler
ports:
  - name: tcp-comm
    port: 8786
    targetPort: tcp-comm
    protocol: TCP
  - name: http-dashboard
    port: 8787
    targetPort: http-dashboard
    protocol: TCP
{{- end -}}

{{/* One worker pod spec; `kind` is "cpu" or "gpu". The worker name comes from
DASK_WORKER_NAME, which the operator injects (plain mode: the pod name). */}}
{{- define "palstream.workerPodSpec" -}}
{{- $root := .root -}}
{{- $kind := .kind -}}
{{- $w := index $root.Values.workers $kind -}}
{{ include "palstream.podCommon" $root }}
{{- if and (eq $kind "gpu") $w.runtimeClassName }}
runtimeClassName: {{ $w.runtimeClassName }}
{{- end }}
containers:
  - name: worker
    image: {{ include "palstream.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      {{- if eq $kind "gpu" }}
      - dask-cuda-worker
      - $(DASK_SCHEDULER_ADDRESS)
      {{- else }}
      - dask
      - worker
      - $(DASK_SCHEDULER_ADDRESS)
      {{- end }}
      - --name
      - $(DASK_WORKER_NAME)
      - --nthreads
      - {{ $w.nthreads | quote }}
      - --dashboard-address
      - ":8788"
      - --local-directory
      - /tmp/dask
      {{- range $w.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    env:
      {{- include "palstream.env" $root | nindent 6 }}
      {{- if not $root.Values.operator }}
      - name: DASK_SCHEDULER_ADDRESS
        value: {{ include "palstream.schedulerAddress" $root }}
      - name: DASK_WORKER_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      {{- end }}
    ports:
      - name: http-dashboard
        containerPort: 8788
        protocol: TCP
    resources:
      {{- $res := deepCopy $w.resources }}
      {{- if eq $kind "gpu" }}
      {{- /* extended resources: requests must equal limits */}}
      {{- range $part := list "requests" "limits" }}
      {{- $m := default dict (index $res $part) }}
      {{- $_ := set $m "nvidia.com/gpu" (int $w.gpus) }}
      {{- $_ := set $res $part $m }}
      {{- end }}
      {{- end }}
      {{- toYaml $res | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.securityContext | nindent 6 }}
    volumeMounts:
      {{- include "palstream.volumeMounts" $root | nindent 6 }}
volumes:
  {{- include "palstream.volumes" $root | nindent 2 }}
{{- with $w.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $w.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
