package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"math"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	podresource "k8s.io/kubernetes/pkg/api/v1/resource"
	"k8s.io/kubernetes/pkg/fieldpath"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

// The podman runtime runs each pod's containers with podman, as root, on the
// host network (there is no CNI here): a pod's IP is 127.0.0.1, and pods
// share the machine's ports. What a kubelet does and what this one maps:
//
//   - image: only from local podman storage (`podman run --pull never`); a
//     missing image is Waiting ErrImagePull, then ImagePullBackOff (or
//     ErrImageNeverPull), checked again every few seconds;
//   - command/args ($(VAR) expanded), workingDir, env (value, fieldRef,
//     resourceFieldRef, secretKeyRef, configMapKeyRef) and envFrom;
//     KUBERNETES_SERVICE_HOST/PORT name the real API server (127.0.0.1 is in
//     its certificate). Values that come from Secrets are handed to podman
//     through its environment, never on its command line;
//   - volumes (files on disk under the root dir, bind-mounted): emptyDir
//     (Memory too, as a directory), hostPath, secret, configMap, downwardAPI,
//     projected (secret, configMap, downwardAPI, serviceAccountToken by the
//     TokenRequest API, bound to the pod; tokens are not refreshed);
//   - host names: --hostname is the pod's hostname (Volcano's svc plugin sets
//     hostname and subdomain); the names of the pods of the same subdomain
//     (from the pods here and the svc plugin's ConfigMap), the subdomain's
//     Service and kubernetes.default resolve to 127.0.0.1 (--add-host, short
//     and .<ns>.svc.cluster.local forms);
//   - securityContext: runAsUser/runAsGroup/supplementalGroups/fsGroup,
//     runAsNonRoot (checked against the image's user like a kubelet),
//     readOnlyRootFilesystem (no tmpfs added), allowPrivilegeEscalation=false
//     (no-new-privileges), capabilities add/drop, privileged, seccomp
//     Unconfined;
//   - resources: limits.cpu → --cpus (at most the machine's cores),
//     limits.memory → --memory (OOMKilled reported), requests.cpu →
//     --cpu-shares; extended resources (nvidia.com/gpu) and ephemeral storage
//     are only counted by the scheduler, not enforced; nofile/nproc ulimits
//     are fixed (20000/4096);
//   - terminationMessagePath (a bind-mounted file) and FallbackToLogsOnError
//     into the terminated state's message; exit codes into container states,
//     restarts by restartPolicy (back-off 1 s doubling to 20 s), the pod's
//     phase as a kubelet computes it; init containers, one after the other;
//   - no probes, no lifecycle hooks, no Events: a running container is ready;
//   - deletion: `podman stop` with the grace period, then removed; the kubelet
//     removes every container it started when it stops.
//
// Logs: <root>/logs/<namespace>_<pod>_<uid>/<container>/<restart>.log (podman's
// k8s-file format: time, stream, tag, line), kept after the pod is gone.
const (
	containerLabel    = "dev.nso.kubelet.root"
	maxCrashBackoff   = 20 * time.Second
	imageRecheck      = 3 * time.Second
	maxTerminationMsg = 4096
)

type podmanRuntime struct {
	k        *fastKubelet
	podman   string
	root     string
	apiHost  string
	apiPort  string
	capacity corev1.ResourceList
	mu       sync.Mutex
	workers  map[types.UID]*podWorker
	wg       sync.WaitGroup
}

func newPodmanRuntime(ctx context.Context, k *fastKubelet, root, apiURL string, capacity corev1.ResourceList) (*podmanRuntime, error) {
	bin, err := exec.LookPath("podman")
	if err != nil {
		return nil, fmt.Errorf("the podman runtime needs podman: %w", err)
	}
	server, err := url.Parse(apiURL)
	if err != nil {
		return nil, fmt.Errorf("API server URL %q: %w", apiURL, err)
	}
	port := server.Port()
	if port == "" {
		port = "443"
	}
	root, err = filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	for _, dir := range []string{"pods", "logs"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return nil, err
		}
	}
	r := &podmanRuntime{k: k, podman: bin, root: root, apiHost: server.Hostname(), apiPort: port,
		capacity: capacity, workers: map[types.UID]*podWorker{}}
	r.removeAll(ctx) // a previous kubelet's leftovers with this root dir
	return r, nil
}

func (r *podmanRuntime) version() string {
	out, err := r.run(context.Background(), nil, "version", "--format", "{{.Client.Version}}")
	if err != nil {
		return "podman://unknown"
	}
	return "podman://" + strings.TrimSpace(out)
}

// run runs podman; extraEnv is added to its environment (values of --env NAME).
func (r *podmanRuntime) run(ctx context.Context, extraEnv []string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, r.podman, args...)
	if extraEnv != nil {
		cmd.Env = append(os.Environ(), extraEnv...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		message := strings.TrimPrefix(strings.TrimSpace(stderr.String()), "Error: ")
		if message == "" {
			message = err.Error()
		}
		return stdout.String(), errors.New(message)
	}
	return stdout.String(), nil
}

// removeAll removes every container this kubelet (its root dir) started.
func (r *podmanRuntime) removeAll(ctx context.Context) {
	out, err := r.run(ctx, nil, "ps", "-a", "-q", "--filter", "label="+containerLabel+"="+r.root)
	if err != nil {
		log.Printf("podman ps: %v", err)
		return
	}
	if ids := strings.Fields(out); len(ids) > 0 {
		if _, err := r.run(ctx, nil, append([]string{"rm", "-f", "-t", "1"}, ids...)...); err != nil {
			log.Printf("podman rm: %v", err)
		}
	}
}

// shutdown stops every pod's containers (briefly: the cluster is going down) and removes them.
func (r *podmanRuntime) shutdown() {
	r.mu.Lock()
	for _, w := range r.workers {
		w.terminate(1)
	}
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(6 * time.Second):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	r.removeAll(ctx)
}

// sync: a bound pod gets a worker that runs it to its end; a pod being
// deleted has its containers stopped with its grace period, then is deleted.
func (r *podmanRuntime) sync(ctx context.Context, key string, pod *corev1.Pod) error {
	if pod == nil { // gone from the API (deleted at once): stop what still runs
		r.mu.Lock()
		var gone []*podWorker
		for uid, w := range r.workers {
			if w.key == key {
				w.terminate(0)
				delete(r.workers, uid)
				gone = append(gone, w)
			}
		}
		r.mu.Unlock()
		for _, w := range gone {
			go func() { <-w.done; w.removeDir() }()
		}
		return nil
	}
	r.mu.Lock()
	w := r.workers[pod.UID]
	r.mu.Unlock()
	if pod.DeletionTimestamp != nil {
		if w != nil {
			w.terminate(gracePeriod(pod))
			select {
			case <-w.done:
			default:
				return nil // the worker enqueues the pod again when its containers are gone
			}
			w.removeDir()
		}
		grace := int64(0)
		uid := pod.UID
		err := r.k.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name,
			metav1.DeleteOptions{GracePeriodSeconds: &grace, Preconditions: &metav1.Preconditions{UID: &uid}})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil
		}
		return err
	}
	if w != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	w = newPodWorker(r, key, pod)
	r.mu.Lock()
	r.workers[pod.UID] = w
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		w.run(ctx)
		close(w.done)
		r.k.queue.Add(key)
	}()
	return nil
}

func gracePeriod(pod *corev1.Pod) int64 {
	if pod.DeletionGracePeriodSeconds != nil {
		return *pod.DeletionGracePeriodSeconds
	}
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		return *pod.Spec.TerminationGracePeriodSeconds
	}
	return 30
}

// --- one pod -------------------------------------------------------------------

type podWorker struct {
	r    *podmanRuntime
	key  string
	pod  *corev1.Pod // as first seen: the spec does not change
	dir  string      // volumes and termination messages
	logs string
	done chan struct{}

	mu        sync.Mutex
	stopping  bool
	grace     int64
	running   map[string]bool // container names started and not yet removed
	init      []corev1.ContainerStatus
	main      []corev1.ContainerStatus
	initDone  bool
	initFail  bool
	volumes   bool
	startTime metav1.Time
	publishMu sync.Mutex
}

func newPodWorker(r *podmanRuntime, key string, pod *corev1.Pod) *podWorker {
	w := &podWorker{r: r, key: key, pod: pod.DeepCopy(), done: make(chan struct{}), running: map[string]bool{},
		dir:       filepath.Join(r.root, "pods", string(pod.UID)),
		logs:      filepath.Join(r.root, "logs", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID)),
		startTime: metav1.Now()}
	waiting := func(c corev1.Container, reason string) corev1.ContainerStatus {
		return corev1.ContainerStatus{Name: c.Name, Image: c.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason}}}
	}
	for _, c := range pod.Spec.InitContainers {
		w.init = append(w.init, waiting(c, "PodInitializing"))
	}
	reason := "ContainerCreating"
	if len(pod.Spec.InitContainers) > 0 {
		reason = "PodInitializing"
	}
	for _, c := range pod.Spec.Containers {
		w.main = append(w.main, waiting(c, reason))
	}
	w.initDone = len(pod.Spec.InitContainers) == 0
	return w
}

// terminate asks the worker to stop its containers within grace seconds (idempotent).
func (w *podWorker) terminate(grace int64) {
	w.mu.Lock()
	if w.stopping {
		if grace < w.grace {
			w.grace = grace
		}
		w.mu.Unlock()
		return
	}
	w.stopping, w.grace = true, grace
	names := make([]string, 0, len(w.running))
	for name := range w.running {
		names = append(names, name)
	}
	w.mu.Unlock()
	for _, name := range names {
		go w.stopContainer(name, grace)
	}
}

func (w *podWorker) isStopping() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stopping
}

func (w *podWorker) stopContainer(name string, grace int64) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(grace+20)*time.Second)
	defer cancel()
	if _, err := w.r.run(ctx, nil, "stop", "-t", strconv.FormatInt(grace, 10), name); err != nil &&
		!strings.Contains(err.Error(), "no such container") {
		log.Printf("pod %s: podman stop %s: %v", w.key, name, err)
	}
}

func (w *podWorker) removeDir() {
	if err := os.RemoveAll(w.dir); err != nil {
		log.Printf("pod %s: %v", w.key, err)
	}
}

// sleep waits d unless the pod is being stopped; false when it is.
func (w *podWorker) sleep(ctx context.Context, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if w.isStopping() || ctx.Err() != nil {
			return false
		}
		time.Sleep(min(200*time.Millisecond, time.Until(deadline)))
	}
	return !w.isStopping() && ctx.Err() == nil
}

func (w *podWorker) run(ctx context.Context) {
	w.publish(ctx)
	volumes, ok := w.prepareVolumes(ctx)
	if !ok {
		return
	}
	w.mu.Lock()
	w.volumes = true
	w.mu.Unlock()
	w.publish(ctx)
	for i := range w.pod.Spec.InitContainers {
		if !w.runContainer(ctx, &w.pod.Spec.InitContainers[i], volumes, true) {
			w.publish(ctx)
			return
		}
	}
	w.mu.Lock()
	w.initDone = true
	for i := range w.main {
		w.main[i].State.Waiting.Reason = "ContainerCreating"
	}
	w.mu.Unlock()
	w.publish(ctx)
	var group sync.WaitGroup
	for i := range w.pod.Spec.Containers {
		group.Add(1)
		go func() {
			defer group.Done()
			w.runContainer(ctx, &w.pod.Spec.Containers[i], volumes, false)
		}()
	}
	group.Wait()
}

// status returns the status entry of a container (under w.mu).
func (w *podWorker) status(name string, init bool) *corev1.ContainerStatus {
	list := w.main
	if init {
		list = w.init
	}
	for i := range list {
		if list[i].Name == name {
			return &list[i]
		}
	}
	panic("no status for container " + name)
}

func (w *podWorker) setWaiting(ctx context.Context, c *corev1.Container, init bool, reason, message string) {
	w.mu.Lock()
	s := w.status(c.Name, init)
	s.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: message}}
	s.Ready = false
	w.mu.Unlock()
	w.publish(ctx)
}

// runContainer runs a container until it ends for good (restarts by the pod's
// restartPolicy); true when it ended with 0 (init containers go on then).
func (w *podWorker) runContainer(ctx context.Context, c *corev1.Container, volumes map[string]string, init bool) bool {
	policy := w.pod.Spec.RestartPolicy
	backoff := time.Second
	for attempt := 0; ; attempt++ {
		code, ran := w.runOnce(ctx, c, volumes, init, attempt)
		if !ran {
			return false
		}
		restart := policy == corev1.RestartPolicyAlways && !init ||
			(policy != corev1.RestartPolicyNever && code != 0)
		if !restart || w.isStopping() {
			if init && code != 0 {
				w.mu.Lock()
				w.initFail = true
				w.mu.Unlock()
			}
			return code == 0
		}
		w.mu.Lock()
		s := w.status(c.Name, init)
		s.LastTerminationState = s.State
		w.mu.Unlock()
		w.setWaiting(ctx, c, init, "CrashLoopBackOff",
			fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)", backoff, c.Name, w.pod.Name, w.pod.Namespace, w.pod.UID))
		if !w.sleep(ctx, backoff) {
			return false
		}
		backoff = min(2*backoff, maxCrashBackoff)
	}
}

type inspected struct {
	ID    string `json:"Id"`
	Image string `json:"Image"`
	State struct {
		ExitCode   int32     `json:"ExitCode"`
		OOMKilled  bool      `json:"OOMKilled"`
		StartedAt  time.Time `json:"StartedAt"`
		FinishedAt time.Time `json:"FinishedAt"`
	} `json:"State"`
}

// runOnce runs one attempt of a container: waits for its image and its
// configuration, starts it, waits for its end and records it. ran is false
// when the pod is stopped before the container ends by itself.
func (w *podWorker) runOnce(ctx context.Context, c *corev1.Container, volumes map[string]string, init bool, attempt int) (int32, bool) {
	image, ok := w.waitForImage(ctx, c, init)
	if !ok {
		return 0, false
	}
	var args, secretEnv []string
	for {
		var err error
		args, secretEnv, err = w.podmanArgs(ctx, c, image, volumes, attempt)
		if err == nil {
			break
		}
		w.setWaiting(ctx, c, init, "CreateContainerConfigError", err.Error())
		if !w.sleep(ctx, imageRecheck) {
			return 0, false
		}
	}
	name := w.containerName(c)
	w.mu.Lock()
	if w.stopping {
		w.mu.Unlock()
		return 0, false
	}
	w.running[name] = true
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.running, name)
		w.mu.Unlock()
		rmCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := w.r.run(rmCtx, nil, "rm", "-f", "-t", "0", name); err != nil && !strings.Contains(err.Error(), "no such container") {
			log.Printf("pod %s: podman rm %s: %v", w.key, name, err)
		}
	}()
	_, _ = w.r.run(ctx, nil, "rm", "-f", "-t", "0", name) // a leftover of this name
	messageFile := filepath.Join(w.dir, "containers", c.Name, "termination-log")
	if err := os.WriteFile(messageFile, nil, 0o666); err != nil {
		return w.startFailed(ctx, c, init, err)
	}
	_ = os.Chmod(messageFile, 0o666)
	if _, err := w.r.run(ctx, secretEnv, args...); err != nil {
		return w.startFailed(ctx, c, init, err)
	}
	if stopping := w.isStopping(); stopping {
		w.stopContainer(name, 0)
	}
	state, err := w.inspect(ctx, name)
	if err != nil {
		return w.startFailed(ctx, c, init, err)
	}
	started := true
	w.mu.Lock()
	s := w.status(c.Name, init)
	if attempt > 0 {
		s.RestartCount++
	}
	s.ContainerID, s.ImageID = "podman://"+state.ID, "sha256:"+strings.TrimPrefix(state.Image, "sha256:")
	s.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(state.State.StartedAt)}}
	s.Ready, s.Started = !init, &started
	w.mu.Unlock()
	w.publish(ctx)

	// Not bound to ctx: the container ends by itself or by terminate().
	if _, err := w.r.run(context.Background(), nil, "wait", name); err != nil {
		log.Printf("pod %s: podman wait %s: %v", w.key, name, err)
	}
	state, err = w.inspect(context.Background(), name)
	if err != nil {
		log.Printf("pod %s: %v", w.key, err)
		state = &inspected{ID: strings.TrimPrefix(s.ContainerID, "podman://")}
		state.State.ExitCode, state.State.FinishedAt = 137, time.Now()
	}
	code := state.State.ExitCode
	reason := "Completed"
	switch {
	case state.State.OOMKilled:
		reason = "OOMKilled"
	case code != 0:
		reason = "Error"
	}
	message := w.terminationMessage(c, messageFile, code, attempt)
	notStarted := false
	w.mu.Lock()
	s = w.status(c.Name, init)
	s.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, Message: message, ContainerID: s.ContainerID,
		StartedAt: metav1.NewTime(state.State.StartedAt), FinishedAt: metav1.NewTime(state.State.FinishedAt)}}
	s.Ready, s.Started = false, &notStarted
	w.mu.Unlock()
	w.publish(ctx)
	return code, true
}

// startFailed records a container that podman could not start: a kubelet
// reports it as terminated with 128 and reason StartError.
func (w *podWorker) startFailed(ctx context.Context, c *corev1.Container, init bool, err error) (int32, bool) {
	now := metav1.Now()
	w.mu.Lock()
	s := w.status(c.Name, init)
	s.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: 128, Reason: "StartError", Message: err.Error(), StartedAt: now, FinishedAt: now}}
	s.Ready = false
	w.mu.Unlock()
	w.publish(ctx)
	return 128, true
}

func (w *podWorker) containerName(c *corev1.Container) string {
	return fmt.Sprintf("k8s_%s_%s_%s_%s", c.Name, w.pod.Name, w.pod.Namespace, w.pod.UID)
}

func (w *podWorker) inspect(ctx context.Context, name string) (*inspected, error) {
	out, err := w.r.run(ctx, nil, "container", "inspect", name)
	if err != nil {
		return nil, fmt.Errorf("podman inspect %s: %w", name, err)
	}
	var states []inspected
	if err := json.Unmarshal([]byte(out), &states); err != nil || len(states) != 1 {
		return nil, fmt.Errorf("podman inspect %s: unreadable answer (%v)", name, err)
	}
	return &states[0], nil
}

// terminationMessage: the file the container wrote, else (FallbackToLogsOnError
// and a failure) the end of its log.
func (w *podWorker) terminationMessage(c *corev1.Container, file string, code int32, attempt int) string {
	data, _ := os.ReadFile(file)
	if len(data) > maxTerminationMsg {
		data = data[:maxTerminationMsg]
	}
	if len(data) > 0 || c.TerminationMessagePolicy != corev1.TerminationMessageFallbackToLogsOnError || code == 0 {
		return string(data)
	}
	return tailLog(w.logFile(c, attempt), 80, 2048)
}

func (w *podWorker) logFile(c *corev1.Container, attempt int) string {
	return filepath.Join(w.logs, c.Name, fmt.Sprintf("%d.log", attempt))
}

// tailLog: the last lines (at most maxBytes) of a k8s-file log, without the
// time/stream/tag prefix of each line.
func tailLog(path string, maxLines, maxBytes int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	var lines []string
	partial := false // the previous record was a partial line (tag P): this one continues it
	for _, record := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		fields := strings.SplitN(record, " ", 4)
		text := record
		if len(fields) == 4 {
			text = fields[3]
		}
		if partial && len(lines) > 0 {
			lines[len(lines)-1] += text
		} else {
			lines = append(lines, text)
		}
		partial = len(fields) == 4 && fields[2] == "P"
	}
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	text := strings.Join(lines, "\n")
	if len(text) > maxBytes {
		text = text[len(text)-maxBytes:]
	}
	return text
}

// waitForImage: the image's ID and user once it is in local storage (there is
// no registry to pull from), Waiting with a pull error's reason meanwhile.
func (w *podWorker) waitForImage(ctx context.Context, c *corev1.Container, init bool) (*imageInfo, bool) {
	for tries := 0; ; tries++ {
		info, err := w.r.image(ctx, c.Image)
		if err == nil {
			return info, true
		}
		reason, message := "ErrImagePull", fmt.Sprintf("image %q is not in the node's podman storage and the nso-dev kubelet pulls from no registry (build or load it: podman images): %v", c.Image, err)
		if c.ImagePullPolicy == corev1.PullNever {
			reason, message = "ErrImageNeverPull", fmt.Sprintf("Container image %q is not present with pull policy of Never", c.Image)
		} else if tries > 0 {
			reason = "ImagePullBackOff"
		}
		w.setWaiting(ctx, c, init, reason, message)
		if !w.sleep(ctx, imageRecheck) {
			return nil, false
		}
	}
}

type imageInfo struct {
	ID   string
	User string
}

func (r *podmanRuntime) image(ctx context.Context, name string) (*imageInfo, error) {
	out, err := r.run(ctx, nil, "image", "inspect", "--format", "{{.Id}}\t{{.Config.User}}", name)
	if err != nil {
		return nil, err
	}
	id, user, _ := strings.Cut(strings.TrimSpace(out), "\t")
	return &imageInfo{ID: id, User: user}, nil
}

// --- a container's podman run --------------------------------------------------

// sensitiveNames are read by podman itself: Secret values under these names go on its command line.
var sensitiveNames = map[string]bool{"PATH": true, "HOME": true, "TMPDIR": true, "LANG": true}

func (w *podWorker) podmanArgs(ctx context.Context, c *corev1.Container, image *imageInfo, volumes map[string]string, attempt int) ([]string, []string, error) {
	pod := w.pod
	env, secret, err := w.environment(ctx, c)
	if err != nil {
		return nil, nil, err
	}
	values := map[string]string{}
	for _, e := range env {
		values[e.Name] = e.Value
	}
	expand := expansion.MappingFuncFor(values)
	name := w.containerName(c)
	hostname := pod.Spec.Hostname
	if hostname == "" {
		hostname = pod.Name
	}
	if len(hostname) > 63 {
		hostname = hostname[:63]
	}
	if err := os.MkdirAll(filepath.Join(w.logs, c.Name), 0o755); err != nil {
		return nil, nil, err
	}
	if err := os.MkdirAll(filepath.Join(w.dir, "containers", c.Name), 0o755); err != nil {
		return nil, nil, err
	}
	args := []string{"run", "-d", "--name", name, "--pull", "never", "--runtime", "runc",
		"--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
		"--network", "host", "--hostname", hostname, "--http-proxy=false",
		"--label", containerLabel + "=" + w.r.root,
		"--label", "io.kubernetes.pod.namespace=" + pod.Namespace, "--label", "io.kubernetes.pod.name=" + pod.Name,
		"--label", "io.kubernetes.pod.uid=" + string(pod.UID), "--label", "io.kubernetes.container.name=" + c.Name,
		"--log-driver", "k8s-file", "--log-opt", "path=" + w.logFile(c, attempt),
	}
	for _, host := range w.hostNames(ctx, hostname) {
		args = append(args, "--add-host", host+":127.0.0.1")
	}
	var secretEnv []string
	for _, e := range env {
		if secret[e.Name] && !sensitiveNames[e.Name] {
			args = append(args, "--env", e.Name)
			secretEnv = append(secretEnv, e.Name+"="+e.Value)
		} else {
			args = append(args, "--env", e.Name+"="+e.Value)
		}
	}
	security, err := w.securityArgs(c, image)
	if err != nil {
		return nil, nil, err
	}
	args = append(args, security...)
	args = append(args, resourceArgs(c)...)
	for _, m := range c.VolumeMounts {
		host, ok := volumes[m.Name]
		if !ok {
			return nil, nil, fmt.Errorf("volumeMount %q: no volume of that name in the pod", m.Name)
		}
		sub := m.SubPath
		if m.SubPathExpr != "" {
			sub = expansion.Expand(m.SubPathExpr, expand)
		}
		if sub != "" {
			if filepath.IsAbs(sub) || strings.HasPrefix(filepath.Clean(sub), "..") {
				return nil, nil, fmt.Errorf("volumeMount %q: subPath %q must be a relative path inside the volume", m.Name, sub)
			}
			host = filepath.Join(host, sub)
			if _, err := os.Stat(host); os.IsNotExist(err) {
				if err := os.MkdirAll(host, 0o777); err != nil {
					return nil, nil, err
				}
			}
		}
		mount := fmt.Sprintf("type=bind,source=%s,destination=%s", host, m.MountPath)
		if m.ReadOnly || readOnlyVolume(pod, m.Name) {
			mount += ",ro=true"
		}
		args = append(args, "--mount", mount)
	}
	path := c.TerminationMessagePath
	if path == "" {
		path = corev1.TerminationMessagePathDefault
	}
	args = append(args, "--mount", fmt.Sprintf("type=bind,source=%s,destination=%s",
		filepath.Join(w.dir, "containers", c.Name, "termination-log"), path))
	if c.WorkingDir != "" {
		args = append(args, "--workdir", c.WorkingDir)
	}
	if len(c.Command) > 0 {
		command := make([]string, len(c.Command))
		for i, part := range c.Command {
			command[i] = expansion.Expand(part, expand)
		}
		entrypoint, _ := json.Marshal(command)
		args = append(args, "--entrypoint", string(entrypoint))
	}
	args = append(args, image.ID)
	for _, part := range c.Args {
		args = append(args, expansion.Expand(part, expand))
	}
	return args, secretEnv, nil
}

func readOnlyVolume(pod *corev1.Pod, name string) bool {
	for _, v := range pod.Spec.Volumes {
		if v.Name == name {
			return v.Secret != nil || v.ConfigMap != nil || v.Projected != nil || v.DownwardAPI != nil
		}
	}
	return false
}

// hostNames resolve to 127.0.0.1 in the container: the pod's own names, the
// names of the pods of its subdomain (Volcano's svc plugin: hostname =
// pod name, subdomain = job name, a headless Service of that name), the
// subdomain's Service, and the API server's Service. The peers' bare host
// names too: a process that names itself by its host name (torchrun's
// MASTER_ADDR) is reached by that name, as cluster DNS would resolve its FQDN.
func (w *podWorker) hostNames(ctx context.Context, hostname string) []string {
	pod := w.pod
	names := map[string]bool{hostname: true}
	add := func(base string) {
		for _, suffix := range []string{"", "." + pod.Namespace, "." + pod.Namespace + ".svc", "." + pod.Namespace + ".svc.cluster.local"} {
			names[base+suffix] = true
		}
	}
	for _, base := range []string{"kubernetes"} {
		for _, suffix := range []string{"", ".default", ".default.svc", ".default.svc.cluster.local"} {
			names[base+suffix] = true
		}
	}
	if sub := pod.Spec.Subdomain; sub != "" {
		add(sub)
		add(hostname + "." + sub)
		for _, obj := range w.r.k.pods.List() {
			peer := obj.(*corev1.Pod)
			if peer.Namespace == pod.Namespace && peer.Spec.Subdomain == sub && peer.Spec.Hostname != "" {
				add(peer.Spec.Hostname + "." + sub)
				names[peer.Spec.Hostname] = true
			}
		}
		// Volcano's svc plugin lists every task's hosts in <job>-svc, pods not created yet too.
		if cm, err := w.r.k.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, sub+"-svc", metav1.GetOptions{}); err == nil {
			for key, value := range cm.Data {
				if strings.HasSuffix(key, ".host") {
					for _, host := range strings.Fields(value) {
						add(host)
						bare, _, _ := strings.Cut(host, ".")
						names[bare] = true
					}
				}
			}
		}
	}
	// The pod's own names first: a reverse lookup of 127.0.0.1 answers the
	// first line, and a process's FQDN (socket.getfqdn, which torchrun's
	// rendezvous uses to tell nodes apart) must be its own, as on a cluster.
	own := hostname
	if pod.Spec.Subdomain != "" {
		own = hostname + "." + pod.Spec.Subdomain + "." + pod.Namespace + ".svc.cluster.local"
	}
	delete(names, own)
	delete(names, hostname)
	list := make([]string, 0, len(names))
	for name := range names {
		list = append(list, name)
	}
	sort.Strings(list)
	if own != hostname {
		return append([]string{own, hostname}, list...)
	}
	return append([]string{hostname}, list...)
}

func (w *podWorker) securityArgs(c *corev1.Container, image *imageInfo) ([]string, error) {
	pod := w.pod
	podSC := pod.Spec.SecurityContext
	if podSC == nil {
		podSC = &corev1.PodSecurityContext{}
	}
	sc := c.SecurityContext
	if sc == nil {
		sc = &corev1.SecurityContext{}
	}
	user, group, nonRoot := podSC.RunAsUser, podSC.RunAsGroup, podSC.RunAsNonRoot
	if sc.RunAsUser != nil {
		user = sc.RunAsUser
	}
	if sc.RunAsGroup != nil {
		group = sc.RunAsGroup
	}
	if sc.RunAsNonRoot != nil {
		nonRoot = sc.RunAsNonRoot
	}
	where := fmt.Sprintf("(pod: %q, container: %s)", pod.Name+"_"+pod.Namespace+"("+string(pod.UID)+")", c.Name)
	if nonRoot != nil && *nonRoot {
		switch {
		case user != nil && *user == 0:
			return nil, fmt.Errorf("container's runAsUser breaks non-root policy %s", where)
		case user == nil:
			imageUser, _, _ := strings.Cut(image.User, ":")
			uid, err := strconv.ParseInt(imageUser, 10, 64)
			switch {
			case imageUser == "" || (err == nil && uid == 0):
				return nil, fmt.Errorf("container has runAsNonRoot and image will run as root %s", where)
			case err != nil:
				return nil, fmt.Errorf("container has runAsNonRoot and image has non-numeric user (%s), cannot verify user is non-root %s", imageUser, where)
			}
		}
	}
	var args []string
	switch {
	case user != nil && group != nil:
		args = append(args, "--user", fmt.Sprintf("%d:%d", *user, *group))
	case user != nil:
		args = append(args, "--user", strconv.FormatInt(*user, 10))
	case group != nil:
		imageUser, _, _ := strings.Cut(image.User, ":")
		if imageUser == "" {
			imageUser = "0"
		}
		args = append(args, "--user", fmt.Sprintf("%s:%d", imageUser, *group))
	}
	for _, g := range podSC.SupplementalGroups {
		args = append(args, "--group-add", strconv.FormatInt(g, 10))
	}
	if podSC.FSGroup != nil {
		args = append(args, "--group-add", strconv.FormatInt(*podSC.FSGroup, 10))
	}
	if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		args = append(args, "--read-only", "--read-only-tmpfs=false")
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		args = append(args, "--security-opt", "no-new-privileges")
	}
	if sc.Privileged != nil && *sc.Privileged {
		args = append(args, "--privileged")
	}
	if sc.Capabilities != nil {
		for _, capability := range sc.Capabilities.Drop {
			args = append(args, "--cap-drop", string(capability))
		}
		for _, capability := range sc.Capabilities.Add {
			args = append(args, "--cap-add", string(capability))
		}
	}
	seccomp := podSC.SeccompProfile
	if sc.SeccompProfile != nil {
		seccomp = sc.SeccompProfile
	}
	if seccomp != nil && seccomp.Type == corev1.SeccompProfileTypeUnconfined {
		args = append(args, "--security-opt", "seccomp=unconfined")
	}
	return args, nil
}

// resourceArgs: what podman can enforce of a container's resources.
func resourceArgs(c *corev1.Container) []string {
	var args []string
	if cpu, ok := c.Resources.Limits[corev1.ResourceCPU]; ok && !cpu.IsZero() {
		cpus := math.Min(float64(cpu.MilliValue())/1000, float64(runtime.NumCPU()))
		args = append(args, "--cpus", strconv.FormatFloat(math.Max(cpus, 0.01), 'f', 3, 64))
	}
	if memory, ok := c.Resources.Limits[corev1.ResourceMemory]; ok && !memory.IsZero() {
		args = append(args, "--memory", strconv.FormatInt(max(memory.Value(), 6<<20), 10))
	}
	if cpu, ok := c.Resources.Requests[corev1.ResourceCPU]; ok && !cpu.IsZero() {
		args = append(args, "--cpu-shares", strconv.FormatInt(max(cpu.MilliValue()*1024/1000, 2), 10))
	}
	return args
}

// environment: the container's variables in a kubelet's order (the API
// server's Service, envFrom, env with $(VAR) expanded), and which of them come
// from Secrets.
func (w *podWorker) environment(ctx context.Context, c *corev1.Container) ([]corev1.EnvVar, map[string]bool, error) {
	pod, client := w.pod, w.r.k.client
	var env []corev1.EnvVar
	index := map[string]int{}
	secret := map[string]bool{}
	set := func(name, value string, fromSecret bool) {
		if i, ok := index[name]; ok {
			env[i].Value = value
		} else {
			index[name] = len(env)
			env = append(env, corev1.EnvVar{Name: name, Value: value})
		}
		secret[name] = fromSecret
	}
	api := w.r.apiHost + ":" + w.r.apiPort
	set("KUBERNETES_SERVICE_HOST", w.r.apiHost, false)
	set("KUBERNETES_SERVICE_PORT", w.r.apiPort, false)
	set("KUBERNETES_SERVICE_PORT_HTTPS", w.r.apiPort, false)
	set("KUBERNETES_PORT", "tcp://"+api, false)
	set("KUBERNETES_PORT_443_TCP", "tcp://"+api, false)
	set("KUBERNETES_PORT_443_TCP_PROTO", "tcp", false)
	set("KUBERNETES_PORT_443_TCP_PORT", w.r.apiPort, false)
	set("KUBERNETES_PORT_443_TCP_ADDR", w.r.apiHost, false)

	secrets := map[string]*corev1.Secret{}
	configMaps := map[string]*corev1.ConfigMap{}
	getSecret := func(name string) (*corev1.Secret, error) {
		if s, ok := secrets[name]; ok {
			return s, nil
		}
		s, err := client.CoreV1().Secrets(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		secrets[name] = s
		return s, nil
	}
	getConfigMap := func(name string) (*corev1.ConfigMap, error) {
		if m, ok := configMaps[name]; ok {
			return m, nil
		}
		m, err := client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		configMaps[name] = m
		return m, nil
	}
	optional := func(o *bool) bool { return o != nil && *o }

	for _, from := range c.EnvFrom {
		switch {
		case from.SecretRef != nil:
			s, err := getSecret(from.SecretRef.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(from.SecretRef.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("secret %q not found", from.SecretRef.Name)
			}
			for _, key := range sortedKeys(s.Data) {
				set(from.Prefix+key, string(s.Data[key]), true)
			}
		case from.ConfigMapRef != nil:
			m, err := getConfigMap(from.ConfigMapRef.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(from.ConfigMapRef.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("configmap %q not found", from.ConfigMapRef.Name)
			}
			for _, key := range sortedKeys(m.Data) {
				set(from.Prefix+key, m.Data[key], false)
			}
		}
	}
	for _, e := range c.Env {
		values := map[string]string{}
		for _, v := range env {
			values[v.Name] = v.Value
		}
		if e.ValueFrom == nil {
			set(e.Name, expansion.Expand(e.Value, expansion.MappingFuncFor(values)), false)
			continue
		}
		from := e.ValueFrom
		switch {
		case from.FieldRef != nil:
			value, err := w.fieldValue(from.FieldRef.FieldPath)
			if err != nil {
				return nil, nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
			set(e.Name, value, false)
		case from.ResourceFieldRef != nil:
			value, err := podresource.ExtractResourceValueByContainerNameAndNodeAllocatable(from.ResourceFieldRef, pod, c.Name, w.r.capacity)
			if err != nil {
				return nil, nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
			set(e.Name, value, false)
		case from.SecretKeyRef != nil:
			ref := from.SecretKeyRef
			s, err := getSecret(ref.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(ref.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("secret %q not found", ref.Name)
			}
			value, ok := s.Data[ref.Key]
			if !ok {
				if optional(ref.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("couldn't find key %s in Secret %s/%s", ref.Key, pod.Namespace, ref.Name)
			}
			set(e.Name, string(value), true)
		case from.ConfigMapKeyRef != nil:
			ref := from.ConfigMapKeyRef
			m, err := getConfigMap(ref.Name)
			if err != nil {
				if apierrors.IsNotFound(err) && optional(ref.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("configmap %q not found", ref.Name)
			}
			value, ok := m.Data[ref.Key]
			if !ok {
				if optional(ref.Optional) {
					continue
				}
				return nil, nil, fmt.Errorf("couldn't find key %s in ConfigMap %s/%s", ref.Key, pod.Namespace, ref.Name)
			}
			set(e.Name, value, false)
		}
	}
	return env, secret, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for key := range m {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	return keys
}

// fieldValue: a downward API field of the pod.
func (w *podWorker) fieldValue(path string) (string, error) {
	pod := w.pod
	switch path {
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.podIP", "status.hostIPs", "status.podIPs":
		return "127.0.0.1", nil
	}
	return fieldpath.ExtractFieldPathAsString(pod, path)
}

// --- volumes -------------------------------------------------------------------

// prepareVolumes writes every volume of the pod under its directory; the
// pod waits in ContainerCreating (with the reason in the containers' waiting
// message) until they can all be made.
func (w *podWorker) prepareVolumes(ctx context.Context) (map[string]string, bool) {
	for {
		volumes, err := w.writeVolumes(ctx)
		if err == nil {
			return volumes, true
		}
		w.mu.Lock()
		for _, list := range [][]corev1.ContainerStatus{w.init, w.main} {
			for i := range list {
				if list[i].State.Waiting != nil {
					list[i].State.Waiting.Message = err.Error()
				}
			}
		}
		w.mu.Unlock()
		w.publish(ctx)
		if !w.sleep(ctx, imageRecheck) {
			return nil, false
		}
	}
}

func (w *podWorker) writeVolumes(ctx context.Context) (map[string]string, error) {
	pod := w.pod
	volumes := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		dir := filepath.Join(w.dir, "volumes", v.Name)
		fail := func(err error) (map[string]string, error) {
			return nil, fmt.Errorf("MountVolume.SetUp failed for volume %q: %w", v.Name, err)
		}
		switch {
		case v.HostPath != nil:
			volumes[v.Name] = v.HostPath.Path
			continue
		case v.EmptyDir != nil:
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return fail(err)
			}
			if err := os.Chmod(dir, 0o777); err != nil { // like a kubelet's: writable by any user
				return fail(err)
			}
			volumes[v.Name] = dir
			continue
		}
		files := map[string]volumeFile{}
		var err error
		switch {
		case v.Secret != nil:
			err = w.secretFiles(ctx, files, v.Secret.SecretName, v.Secret.Items, v.Secret.DefaultMode, v.Secret.Optional)
		case v.ConfigMap != nil:
			err = w.configMapFiles(ctx, files, v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.DefaultMode, v.ConfigMap.Optional)
		case v.DownwardAPI != nil:
			err = w.downwardFiles(files, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode)
		case v.Projected != nil:
			for _, source := range v.Projected.Sources {
				mode := v.Projected.DefaultMode
				switch {
				case source.Secret != nil:
					err = w.secretFiles(ctx, files, source.Secret.Name, source.Secret.Items, mode, source.Secret.Optional)
				case source.ConfigMap != nil:
					err = w.configMapFiles(ctx, files, source.ConfigMap.Name, source.ConfigMap.Items, mode, source.ConfigMap.Optional)
				case source.DownwardAPI != nil:
					err = w.downwardFiles(files, source.DownwardAPI.Items, mode)
				case source.ServiceAccountToken != nil:
					var token string
					token, err = w.serviceAccountToken(ctx, source.ServiceAccountToken)
					files[source.ServiceAccountToken.Path] = volumeFile{[]byte(token), fileMode(mode, nil)}
				default:
					err = errors.New("a projected source other than secret, configMap, downwardAPI or serviceAccountToken: not supported by the nso-dev kubelet")
				}
				if err != nil {
					break
				}
			}
		default:
			err = errors.New("only emptyDir, hostPath, secret, configMap, downwardAPI and projected volumes are supported by the nso-dev kubelet")
		}
		if err != nil {
			return fail(err)
		}
		if err := writeFiles(dir, files, pod.Spec.SecurityContext); err != nil {
			return fail(err)
		}
		volumes[v.Name] = dir
	}
	return volumes, nil
}

type volumeFile struct {
	data []byte
	mode os.FileMode
}

func fileMode(defaultMode, itemMode *int32) os.FileMode {
	switch {
	case itemMode != nil:
		return os.FileMode(*itemMode)
	case defaultMode != nil:
		return os.FileMode(*defaultMode)
	}
	return 0o644
}

func keyFiles(files map[string]volumeFile, data map[string][]byte, items []corev1.KeyToPath, mode *int32, what string) error {
	if len(items) == 0 {
		for key, value := range data {
			files[key] = volumeFile{value, fileMode(mode, nil)}
		}
		return nil
	}
	for _, item := range items {
		value, ok := data[item.Key]
		if !ok {
			return fmt.Errorf("configured to use key %s of %s, but it has no such key", item.Key, what)
		}
		files[item.Path] = volumeFile{value, fileMode(mode, item.Mode)}
	}
	return nil
}

func (w *podWorker) secretFiles(ctx context.Context, files map[string]volumeFile, name string, items []corev1.KeyToPath, mode *int32, optional *bool) error {
	s, err := w.r.k.client.CoreV1().Secrets(w.pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("secret %q not found", name)
	}
	return keyFiles(files, s.Data, items, mode, "Secret "+name)
}

func (w *podWorker) configMapFiles(ctx context.Context, files map[string]volumeFile, name string, items []corev1.KeyToPath, mode *int32, optional *bool) error {
	m, err := w.r.k.client.CoreV1().ConfigMaps(w.pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("configmap %q not found", name)
	}
	data := map[string][]byte{}
	for key, value := range m.Data {
		data[key] = []byte(value)
	}
	for key, value := range m.BinaryData {
		data[key] = value
	}
	return keyFiles(files, data, items, mode, "ConfigMap "+name)
}

func (w *podWorker) downwardFiles(files map[string]volumeFile, items []corev1.DownwardAPIVolumeFile, mode *int32) error {
	for _, item := range items {
		var value string
		var err error
		switch {
		case item.FieldRef != nil:
			value, err = w.fieldValue(item.FieldRef.FieldPath)
		case item.ResourceFieldRef != nil:
			value, err = podresource.ExtractResourceValueByContainerNameAndNodeAllocatable(item.ResourceFieldRef, w.pod, item.ResourceFieldRef.ContainerName, w.r.capacity)
		}
		if err != nil {
			return fmt.Errorf("downward API file %s: %w", item.Path, err)
		}
		files[item.Path] = volumeFile{[]byte(value), fileMode(mode, item.Mode)}
	}
	return nil
}

// serviceAccountToken asks the API server for a token of the pod's
// ServiceAccount bound to the pod (TokenRequest), as a kubelet does.
func (w *podWorker) serviceAccountToken(ctx context.Context, projection *corev1.ServiceAccountTokenProjection) (string, error) {
	pod := w.pod
	account := pod.Spec.ServiceAccountName
	if account == "" {
		account = "default"
	}
	request := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: projection.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID},
	}}
	if projection.Audience != "" {
		request.Spec.Audiences = []string{projection.Audience}
	}
	got, err := w.r.k.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, account, request, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token of ServiceAccount %s/%s: %w", pod.Namespace, account, err)
	}
	return got.Status.Token, nil
}

// writeFiles writes a volume's files afresh; with an fsGroup, they belong to that group and it may read them.
func writeFiles(dir string, files map[string]volumeFile, sc *corev1.PodSecurityContext) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for path, file := range files {
		clean := filepath.Clean(path)
		if filepath.IsAbs(clean) || strings.HasPrefix(clean, "..") {
			return fmt.Errorf("path %q must be relative and inside the volume", path)
		}
		target := filepath.Join(dir, clean)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		mode := file.mode & 0o777
		if err := os.WriteFile(target, file.data, mode); err != nil {
			return err
		}
		if sc != nil && sc.FSGroup != nil {
			if mode&0o400 != 0 {
				mode |= 0o040
			}
			if err := os.Lchown(target, -1, int(*sc.FSGroup)); err != nil {
				return err
			}
		}
		if err := os.Chmod(target, mode); err != nil {
			return err
		}
	}
	return nil
}

// --- the pod's status ------------------------------------------------------------

// phase as a kubelet computes it (kubelet_pods.go getPhase).
func (w *podWorker) phase() corev1.PodPhase {
	policy := w.pod.Spec.RestartPolicy
	if !w.initDone {
		if w.initFail && policy == corev1.RestartPolicyNever {
			return corev1.PodFailed
		}
		return corev1.PodPending
	}
	var running, waiting, stopped, succeeded int
	for _, s := range w.main {
		switch {
		case s.State.Running != nil:
			running++
		case s.State.Terminated != nil:
			stopped++
			if s.State.Terminated.ExitCode == 0 {
				succeeded++
			}
		case s.State.Waiting != nil && s.LastTerminationState.Terminated != nil:
			stopped++
		default:
			waiting++
		}
	}
	switch {
	case waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case policy == corev1.RestartPolicyAlways:
		return corev1.PodRunning
	case stopped == succeeded:
		return corev1.PodSucceeded
	case policy == corev1.RestartPolicyNever:
		return corev1.PodFailed
	}
	return corev1.PodRunning
}

// publish writes the pod's status as this worker knows it (one write at a time, the newest state).
func (w *podWorker) publish(ctx context.Context) {
	w.publishMu.Lock()
	defer w.publishMu.Unlock()
	pods := w.r.k.client.CoreV1().Pods(w.pod.Namespace)
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		current, err := pods.Get(ctx, w.pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if current.UID != w.pod.UID {
			return nil
		}
		w.mu.Lock()
		phase := w.phase()
		ready := phase == corev1.PodRunning
		for _, s := range w.main {
			ready = ready && s.Ready
		}
		status := &current.Status
		status.Phase = phase
		status.HostIP, status.HostIPs = "127.0.0.1", []corev1.HostIP{{IP: "127.0.0.1"}}
		status.PodIP, status.PodIPs = "127.0.0.1", []corev1.PodIP{{IP: "127.0.0.1"}}
		if status.StartTime == nil {
			status.StartTime = &w.startTime
		}
		status.InitContainerStatuses = append([]corev1.ContainerStatus(nil), w.init...)
		status.ContainerStatuses = append([]corev1.ContainerStatus(nil), w.main...)
		for i := range status.InitContainerStatuses {
			status.InitContainerStatuses[i] = *status.InitContainerStatuses[i].DeepCopy()
		}
		for i := range status.ContainerStatuses {
			status.ContainerStatuses[i] = *status.ContainerStatuses[i].DeepCopy()
		}
		terminal := phase == corev1.PodSucceeded || phase == corev1.PodFailed
		volumes, initDone := w.volumes, w.initDone
		w.mu.Unlock()

		bool2 := func(b bool) corev1.ConditionStatus {
			if b {
				return corev1.ConditionTrue
			}
			return corev1.ConditionFalse
		}
		notReady := "ContainersNotReady"
		if terminal {
			notReady = "PodCompleted"
		}
		setCondition(current, corev1.PodReadyToStartContainers, bool2(volumes && !terminal), "")
		if initDone {
			setCondition(current, corev1.PodInitialized, corev1.ConditionTrue, "")
		} else {
			setCondition(current, corev1.PodInitialized, corev1.ConditionFalse, "ContainersNotInitialized")
		}
		for _, kind := range []corev1.PodConditionType{corev1.ContainersReady, corev1.PodReady} {
			if ready {
				setCondition(current, kind, corev1.ConditionTrue, "")
			} else {
				setCondition(current, kind, corev1.ConditionFalse, notReady)
			}
		}
		_, err = pods.UpdateStatus(ctx, current, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) && ctx.Err() == nil {
		log.Printf("pod %s: status: %v", w.key, err)
	}
}
