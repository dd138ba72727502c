package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
)

// The test kubelet registers nodes and runs the pods bound to them, in one of
// two modes (--runtime): fast (below) or podman, which runs the pods'
// containers for real (podman.go); node registration and leases are shared.
//
// The fast kubelet runs no container. It registers nodes (capacity for cpu,
// memory, pods and nvidia.com/gpu) and keeps them Ready as a kubelet does
// (heartbeat below), and for
// every pod bound to one of them plays the kubelet's part of the pod
// lifecycle, so that the controllers above (Volcano's job controller among
// them) see what they would see on a real node:
//
//   - a bound pod is started at once: phase Running, containers running and
//     ready, a pod IP (from 127.1.0.0/16, so that nothing can ever reach a
//     network that is not this machine);
//   - it "exits" when someone writes the annotation ExitCodeAnnotation on it
//     (the test harness does, playing the workload; MessageAnnotation becomes
//     the containers' termination message), or after --exit-after: phase
//     Succeeded or Failed by the exit code and restart policy (Always and
//     OnFailure restart the containers instead, counting restarts);
//   - a pod being deleted is removed at once (grace period 0), as a kubelet
//     does once its containers are gone.
const (
	ExitCodeAnnotation = "kubelet.nso.dev/exit-code"
	MessageAnnotation  = "kubelet.nso.dev/message"
	leaseSeconds       = 40
	kubeletVersion     = "v1.34.4-nso-fast"
	// A kubelet's defaults: its Lease is renewed every quarter of its duration;
	// its node status is computed every nodeStatusUpdateFrequency and posted
	// when it changed (the node lifecycle controller set Ready to Unknown, for
	// one) or nodeStatusReportFrequency after the last post.
	leaseRenewInterval        = leaseSeconds * time.Second / 4
	nodeStatusUpdateFrequency = 10 * time.Second
	nodeStatusReportFrequency = 5 * time.Minute
)

type fastKubelet struct {
	client kubernetes.Interface
	// heartbeat renews Leases and posts node status: unthrottled, each request
	// bounded in time, like a kubelet's heartbeat client, so that a busy pod
	// queue (client's rate limit) never delays them past the node's grace period.
	heartbeat      kubernetes.Interface
	nodes          map[string]bool
	capacity       corev1.ResourceList
	runtimeVersion string
	exitAfter      time.Duration
	pods           cache.Indexer
	queue          workqueue.TypedRateLimitingInterface[string]
	mu             sync.Mutex
	nextIP         int
	// real runs the pods' containers with podman (--runtime podman); nil: the fast mode.
	real *podmanRuntime
}

func kubelet(args []string) error {
	flags := flag.NewFlagSet("kubelet", flag.ExitOnError)
	kubeconfig := flags.String("kubeconfig", "", "kubeconfig of the cluster")
	count := flags.Int("nodes", 2, "how many nodes to register")
	prefix := flags.String("node-prefix", "nso-dev-node-", "node names: this prefix and an index")
	cpu := flags.String("cpu", "16", "cpu capacity of each node")
	memory := flags.String("memory", "64Gi", "memory capacity of each node")
	gpus := flags.String("gpus", "8", "nvidia.com/gpu capacity of each node")
	maxPods := flags.String("pods", "110", "pod capacity of each node")
	exitAfter := flags.Duration("exit-after", 0, "fast: containers exit with 0 after running this long (0: only when annotated)")
	runtimeName := flags.String("runtime", "fast", "fast (no containers) or podman (run the pods' containers, see podman.go)")
	rootDir := flags.String("root-dir", "", "podman: where pods' volumes and container logs are kept (required)")
	_ = flags.Parse(args)

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	config.QPS, config.Burst = 200, 400
	config.UserAgent = "nso-dev-kubelet"
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	heartbeatConfig := rest.CopyConfig(config)
	heartbeatConfig.QPS, heartbeatConfig.Burst = -1, 0
	heartbeatConfig.Timeout = nodeStatusUpdateFrequency
	heartbeat, err := kubernetes.NewForConfig(heartbeatConfig)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	k := &fastKubelet{
		client:    client,
		heartbeat: heartbeat,
		nodes:     map[string]bool{},
		exitAfter: *exitAfter,
		queue:     workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	capacity := corev1.ResourceList{}
	for name, value := range map[corev1.ResourceName]string{
		corev1.ResourceCPU: *cpu, corev1.ResourceMemory: *memory, corev1.ResourcePods: *maxPods,
		"nvidia.com/gpu": *gpus, corev1.ResourceEphemeralStorage: "200Gi",
	} {
		quantity, err := resource.ParseQuantity(value)
		if err != nil {
			return fmt.Errorf("capacity %s=%q: %w", name, value, err)
		}
		capacity[name] = quantity
	}
	k.capacity, k.runtimeVersion = capacity, "nso-dev://fast"
	switch *runtimeName {
	case "fast":
	case "podman":
		if *rootDir == "" {
			return fmt.Errorf("--runtime podman needs --root-dir")
		}
		if k.real, err = newPodmanRuntime(ctx, k, *rootDir, config.Host, capacity); err != nil {
			return err
		}
		k.runtimeVersion = k.real.version()
	default:
		return fmt.Errorf("--runtime %q: fast or podman", *runtimeName)
	}
	for i := range *count {
		name := fmt.Sprintf("%s%d", *prefix, i)
		k.nodes[name] = true
		if err := k.register(ctx, name); err != nil {
			return fmt.Errorf("register node %s: %w", name, err)
		}
	}
	for name := range k.nodes {
		go k.keepReady(ctx, name)
	}

	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermNotEqualSelector("spec.nodeName", "").String()
	}))
	informer := factory.Core().V1().Pods().Informer()
	enqueue := func(obj interface{}) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, obj interface{}) { enqueue(obj) }, DeleteFunc: enqueue,
	}); err != nil {
		return err
	}
	k.pods = informer.GetIndexer()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	for range 4 {
		go k.work(ctx)
	}
	log.Printf("%s kubelet: %d nodes registered (%s0..), running pods", *runtimeName, *count, *prefix)
	<-ctx.Done()
	k.queue.ShutDown()
	if k.real != nil {
		log.Printf("stopping and removing the pods' containers")
		k.real.shutdown()
	}
	return nil
}

func (k *fastKubelet) register(ctx context.Context, name string) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
		"node.kubernetes.io/instance-type": "nso-dev",
	}}}
	if _, err := k.heartbeat.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	// The node controllers update a new node too (taints, annotations): retried on a conflict.
	_, err := k.syncNodeStatus(ctx, name, true)
	return err
}

// keepReady is one node's heartbeat, independent of every other node's (one
// slow request delays no other node): its Lease renewed every
// leaseRenewInterval, its status checked every nodeStatusUpdateFrequency and
// posted when its Ready condition is not True or nodeStatusReportFrequency
// after the last post. Jittered like a kubelet's, so that nodes spread out.
func (k *fastKubelet) keepReady(ctx context.Context, name string) {
	lastReport := time.Now() // at registration
	go wait.JitterUntilWithContext(ctx, func(ctx context.Context) {
		if err := k.renewLease(ctx, name); err != nil && ctx.Err() == nil {
			log.Printf("lease of %s: %v", name, err)
		}
	}, leaseRenewInterval, 0.04, true)
	wait.JitterUntilWithContext(ctx, func(ctx context.Context) {
		posted, err := k.syncNodeStatus(ctx, name, time.Since(lastReport) >= nodeStatusReportFrequency)
		if err != nil && ctx.Err() == nil {
			log.Printf("status of node %s: %v", name, err)
		}
		if posted {
			lastReport = time.Now()
		}
	}, nodeStatusUpdateFrequency, 0.04, true)
}

// syncNodeStatus posts the node's status (capacity, conditions, addresses,
// versions) when `force` or when the node is not Ready (the node lifecycle
// controller sets Ready to Unknown when heartbeats were late; only the
// kubelet sets it back); true when it posted.
func (k *fastKubelet) syncNodeStatus(ctx context.Context, name string, force bool) (bool, error) {
	posted, attempt := false, 0
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		nodes := k.heartbeat.CoreV1().Nodes()
		// Like a kubelet's periodic check: first from the API server's cache, then, after a
		// conflict, from etcd (a forced post, at registration, reads etcd: the cache may not
		// have the node just created).
		get := metav1.GetOptions{}
		if attempt++; attempt == 1 && !force {
			get.ResourceVersion = "0"
		}
		current, err := nodes.Get(ctx, name, get)
		if err != nil {
			return err
		}
		if !force && nodeReady(current) {
			return nil
		}
		setNodeStatus(current, k.capacity, k.runtimeVersion)
		if _, err := nodes.UpdateStatus(ctx, current, metav1.UpdateOptions{}); err != nil {
			return err
		}
		posted = true
		return nil
	})
	return posted, err
}

func nodeReady(node *corev1.Node) bool {
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func setNodeStatus(node *corev1.Node, capacity corev1.ResourceList, runtimeVersion string) {
	now := metav1.Now()
	previous := map[corev1.NodeConditionType]corev1.NodeCondition{}
	for _, c := range node.Status.Conditions {
		previous[c.Type] = c
	}
	condition := func(kind corev1.NodeConditionType, status corev1.ConditionStatus, reason, message string) corev1.NodeCondition {
		transition := now
		if old, ok := previous[kind]; ok && old.Status == status {
			transition = old.LastTransitionTime
		}
		return corev1.NodeCondition{Type: kind, Status: status, Reason: reason, Message: message,
			LastHeartbeatTime: now, LastTransitionTime: transition}
	}
	node.Status = corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			condition(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
			condition(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
			condition(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
			condition(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "nso-dev test kubelet is posting ready status"),
		},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}, {Type: corev1.NodeHostName, Address: node.Name}},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion: kubeletVersion, OperatingSystem: "linux", Architecture: "amd64",
			ContainerRuntimeVersion: runtimeVersion, OSImage: "nso-dev test kubelet",
		},
	}
}

func (k *fastKubelet) renewLease(ctx context.Context, name string) error {
	leases := k.heartbeat.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		node, err := k.heartbeat.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		duration := int32(leaseSeconds)
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: name, OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "v1", Kind: "Node", Name: name, UID: node.UID}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &name, LeaseDurationSeconds: &duration, RenewTime: &now},
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
		return err
	}
	if err != nil {
		return err
	}
	lease.Spec.RenewTime = &now
	_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
	return err
}

func (k *fastKubelet) work(ctx context.Context) {
	for {
		key, quit := k.queue.Get()
		if quit {
			return
		}
		if err := k.sync(ctx, key); err != nil {
			if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
				log.Printf("pod %s: %v", key, err)
			}
			k.queue.AddRateLimited(key)
		} else {
			k.queue.Forget(key)
		}
		k.queue.Done(key)
	}
}

func (k *fastKubelet) sync(ctx context.Context, key string) error {
	obj, exists, err := k.pods.GetByKey(key)
	if err != nil {
		return err
	}
	if !exists {
		if k.real != nil {
			return k.real.sync(ctx, key, nil)
		}
		return nil
	}
	pod := obj.(*corev1.Pod)
	if !k.nodes[pod.Spec.NodeName] {
		return nil
	}
	if k.real != nil {
		return k.real.sync(ctx, key, pod)
	}
	pods := k.client.CoreV1().Pods(pod.Namespace)
	if pod.DeletionTimestamp != nil {
		grace := int64(0)
		uid := pod.UID
		err := pods.Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace, Preconditions: &metav1.Preconditions{UID: &uid}})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil
		}
		return err
	}
	switch pod.Status.Phase {
	case corev1.PodSucceeded, corev1.PodFailed:
		return nil
	case corev1.PodRunning:
		code, message, requested := k.exitRequest(pod)
		if !requested {
			if k.exitAfter > 0 && pod.Status.StartTime != nil {
				k.queue.AddAfter(key, time.Until(pod.Status.StartTime.Add(k.exitAfter)))
			}
			return nil
		}
		return k.exit(ctx, pod.DeepCopy(), code, message)
	default:
		return k.start(ctx, pod.DeepCopy())
	}
}

// exitRequest: the exit code asked for by annotation or by --exit-after.
func (k *fastKubelet) exitRequest(pod *corev1.Pod) (int32, string, bool) {
	if value, ok := pod.Annotations[ExitCodeAnnotation]; ok {
		code, err := strconv.Atoi(strings.TrimSpace(value))
		if err != nil {
			code = 1
		}
		return int32(code), pod.Annotations[MessageAnnotation], true
	}
	if k.exitAfter > 0 && pod.Status.StartTime != nil && time.Since(pod.Status.StartTime.Time) >= k.exitAfter {
		return 0, "", true
	}
	return 0, "", false
}

func (k *fastKubelet) podIP() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.nextIP++
	n := k.nextIP % (254 * 254)
	return fmt.Sprintf("127.1.%d.%d", n/254, n%254+1)
}

func setCondition(pod *corev1.Pod, kind corev1.PodConditionType, status corev1.ConditionStatus, reason string) {
	now := metav1.Now()
	for i := range pod.Status.Conditions {
		c := &pod.Status.Conditions[i]
		if c.Type == kind {
			if c.Status != status {
				c.LastTransitionTime = now
			}
			c.Status, c.Reason = status, reason
			return
		}
	}
	pod.Status.Conditions = append(pod.Status.Conditions, corev1.PodCondition{Type: kind, Status: status, Reason: reason, LastTransitionTime: now})
}

func containerID(pod *corev1.Pod, name string) string {
	return fmt.Sprintf("nso-dev://%s/%s", pod.UID, name)
}

func (k *fastKubelet) start(ctx context.Context, pod *corev1.Pod) error {
	now := metav1.Now()
	ip := k.podIP()
	pod.Status.Phase = corev1.PodRunning
	pod.Status.HostIP, pod.Status.HostIPs = "127.0.0.1", []corev1.HostIP{{IP: "127.0.0.1"}}
	pod.Status.PodIP, pod.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
	pod.Status.StartTime = &now
	for _, kind := range []corev1.PodConditionType{corev1.PodReadyToStartContainers, corev1.PodInitialized,
		corev1.ContainersReady, corev1.PodReady, corev1.PodScheduled} {
		setCondition(pod, kind, corev1.ConditionTrue, "")
	}
	started := true
	pod.Status.InitContainerStatuses = nil
	for _, c := range pod.Spec.InitContainers {
		pod.Status.InitContainerStatuses = append(pod.Status.InitContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "nso-dev://" + c.Image, ContainerID: containerID(pod, c.Name),
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: "Completed", StartedAt: now, FinishedAt: now, ContainerID: containerID(pod, c.Name)}},
		})
	}
	pod.Status.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		pod.Status.ContainerStatuses = append(pod.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "nso-dev://" + c.Image, ContainerID: containerID(pod, c.Name),
			Ready: true, Started: &started,
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	_, err := k.client.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	return err
}

func (k *fastKubelet) exit(ctx context.Context, pod *corev1.Pod, code int32, message string) error {
	now := metav1.Now()
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	restart := pod.Spec.RestartPolicy == corev1.RestartPolicyAlways ||
		(pod.Spec.RestartPolicy == corev1.RestartPolicyOnFailure && code != 0)
	for i := range pod.Status.ContainerStatuses {
		status := &pod.Status.ContainerStatuses[i]
		startedAt := now
		if status.State.Running != nil {
			startedAt = status.State.Running.StartedAt
		}
		terminated := corev1.ContainerStateTerminated{ExitCode: code, Reason: reason, Message: message,
			StartedAt: startedAt, FinishedAt: now, ContainerID: status.ContainerID}
		if restart {
			status.LastTerminationState = corev1.ContainerState{Terminated: &terminated}
			status.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
			status.RestartCount++
		} else {
			status.State = corev1.ContainerState{Terminated: &terminated}
			status.Ready = false
			started := false
			status.Started = &started
		}
	}
	pods := k.client.CoreV1().Pods(pod.Namespace)
	if restart {
		if _, err := pods.UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
			return err
		}
		// Served: the containers run again until the next request.
		patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:null,%q:null}}}`, ExitCodeAnnotation, MessageAnnotation)
		_, err := pods.Patch(ctx, pod.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		return err
	}
	pod.Status.Phase = corev1.PodSucceeded
	if code != 0 {
		pod.Status.Phase = corev1.PodFailed
		pod.Status.Message = message
	}
	setCondition(pod, corev1.PodReady, corev1.ConditionFalse, "PodCompleted")
	setCondition(pod, corev1.ContainersReady, corev1.ConditionFalse, "PodCompleted")
	setCondition(pod, corev1.PodReadyToStartContainers, corev1.ConditionFalse, "")
	_, err := pods.UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	return err
}
