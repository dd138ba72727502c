package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// The namespaces every cluster has. Any other name is answered as well
// (read-only, always Active): objects of custom resources may live in any
// namespace here, since NamespaceLifecycle admission is off.
var namespaces = []string{"default", "kube-node-lease", "kube-public", "kube-system"}

// Events are kept in memory only, so that `kubectl get events` and tests can
// see what an operator posted; the oldest are dropped beyond this many.
const maxEvents = 1000

// coreAPI serves the sliver of the core ("legacy") API group that clients
// expect from any Kubernetes API server: /api, /api/v1, namespaces (read-only)
// and events (create, get, list).
type coreAPI struct {
	started metav1.Time

	mu              sync.Mutex
	resourceVersion int64
	events          []*corev1.Event
}

func newCoreAPI() *coreAPI {
	return &coreAPI{started: metav1.Now()}
}

func (a *coreAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case len(parts) == 1:
		a.only(w, r, http.MethodGet, func() {
			writeJSON(w, http.StatusOK, &metav1.APIVersions{
				TypeMeta: metav1.TypeMeta{Kind: "APIVersions"},
				Versions: []string{"v1"},
				ServerAddressByClientCIDRs: []metav1.ServerAddressByClientCIDR{
					{ClientCIDR: "0.0.0.0/0", ServerAddress: r.Host},
				},
			})
		})
	case parts[1] != "v1":
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound, "the server could not find the requested resource")
	case len(parts) == 2:
		a.only(w, r, http.MethodGet, func() { writeJSON(w, http.StatusOK, resourceList()) })
	case parts[2] == "namespaces" && len(parts) == 3:
		a.only(w, r, http.MethodGet, func() { a.listNamespaces(w, r) })
	case parts[2] == "namespaces" && len(parts) == 4:
		a.only(w, r, http.MethodGet, func() { writeJSON(w, http.StatusOK, a.namespace(parts[3])) })
	case parts[2] == "events" && len(parts) == 3:
		a.only(w, r, http.MethodGet, func() { a.listEvents(w, r, "") })
	case parts[2] == "namespaces" && parts[4] == "events" && len(parts) == 5:
		if r.Method == http.MethodPost {
			a.createEvent(w, r, parts[3])
			return
		}
		a.only(w, r, http.MethodGet, func() { a.listEvents(w, r, parts[3]) })
	case parts[2] == "namespaces" && parts[4] == "events" && len(parts) == 6:
		a.only(w, r, http.MethodGet, func() { a.getEvent(w, parts[3], parts[5]) })
	default:
		writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound, "the server could not find the requested resource")
	}
}

func resourceList() *metav1.APIResourceList {
	return &metav1.APIResourceList{
		TypeMeta:     metav1.TypeMeta{Kind: "APIResourceList", APIVersion: "v1"},
		GroupVersion: "v1",
		APIResources: []metav1.APIResource{
			{Name: "events", SingularName: "event", Namespaced: true, Kind: "Event",
				Verbs: metav1.Verbs{"create", "get", "list", "watch"}, ShortNames: []string{"ev"}},
			{Name: "namespaces", SingularName: "namespace", Namespaced: false, Kind: "Namespace",
				Verbs: metav1.Verbs{"get", "list", "watch"}, ShortNames: []string{"ns"}},
		},
	}
}

// only runs serve for the given method and answers 405 otherwise.
func (a *coreAPI) only(w http.ResponseWriter, r *http.Request, method string, serve func()) {
	if r.Method != method {
		writeStatus(w, http.StatusMethodNotAllowed, metav1.StatusReasonMethodNotAllowed,
			fmt.Sprintf("%s is not supported on %s by this API server (read-only core API)", r.Method, r.URL.Path))
		return
	}
	serve()
}

func (a *coreAPI) namespace(name string) *corev1.Namespace {
	return &corev1.Namespace{
		TypeMeta: metav1.TypeMeta{Kind: "Namespace", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{
			Name:              name,
			UID:               types.UID("namespace-" + name),
			ResourceVersion:   "1",
			CreationTimestamp: a.started,
			Labels:            map[string]string{"kubernetes.io/metadata.name": name},
		},
		Spec:   corev1.NamespaceSpec{Finalizers: []corev1.FinalizerName{corev1.FinalizerKubernetes}},
		Status: corev1.NamespaceStatus{Phase: corev1.NamespaceActive},
	}
}

func (a *coreAPI) listNamespaces(w http.ResponseWriter, r *http.Request) {
	if isWatch(r) {
		holdWatch(w, r)
		return
	}
	list := &corev1.NamespaceList{
		TypeMeta: metav1.TypeMeta{Kind: "NamespaceList", APIVersion: "v1"},
		ListMeta: metav1.ListMeta{ResourceVersion: "1"},
	}
	for _, name := range namespaces {
		list.Items = append(list.Items, *a.namespace(name))
	}
	writeJSON(w, http.StatusOK, list)
}

func (a *coreAPI) createEvent(w http.ResponseWriter, r *http.Request, namespace string) {
	if mediaType, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mediaType != "application/json" {
		writeStatus(w, http.StatusUnsupportedMediaType, metav1.StatusReasonUnsupportedMediaType,
			"events are accepted as application/json only")
		return
	}
	event := &corev1.Event{}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(event); err != nil {
		writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "cannot decode Event: "+err.Error())
		return
	}
	if event.Namespace != "" && event.Namespace != namespace {
		writeStatus(w, http.StatusBadRequest, metav1.StatusReasonBadRequest,
			"the namespace of the provided object does not match the namespace sent on the request")
		return
	}
	if event.Name == "" && event.GenerateName == "" {
		writeStatus(w, http.StatusUnprocessableEntity, metav1.StatusReasonInvalid,
			"Event is invalid: metadata.name: Required value: name or generateName is required")
		return
	}
	if event.Name == "" {
		event.Name = event.GenerateName + randomSuffix()
	}
	event.TypeMeta = metav1.TypeMeta{Kind: "Event", APIVersion: "v1"}
	event.Namespace = namespace
	event.UID = types.UID(randomSuffix() + randomSuffix())
	event.CreationTimestamp = metav1.Now()

	a.mu.Lock()
	a.resourceVersion++
	event.ResourceVersion = strconv.FormatInt(a.resourceVersion, 10)
	a.events = append(a.events, event)
	if len(a.events) > maxEvents {
		a.events = a.events[len(a.events)-maxEvents:]
	}
	a.mu.Unlock()
	writeJSON(w, http.StatusCreated, event)
}

func (a *coreAPI) listEvents(w http.ResponseWriter, r *http.Request, namespace string) {
	if isWatch(r) {
		holdWatch(w, r)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	list := &corev1.EventList{
		TypeMeta: metav1.TypeMeta{Kind: "EventList", APIVersion: "v1"},
		ListMeta: metav1.ListMeta{ResourceVersion: strconv.FormatInt(a.resourceVersion, 10)},
		Items:    []corev1.Event{},
	}
	for _, event := range a.events {
		if namespace == "" || event.Namespace == namespace {
			list.Items = append(list.Items, *event)
		}
	}
	writeJSON(w, http.StatusOK, list)
}

func (a *coreAPI) getEvent(w http.ResponseWriter, namespace, name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, event := range a.events {
		if event.Namespace == namespace && event.Name == name {
			writeJSON(w, http.StatusOK, event)
			return
		}
	}
	writeStatus(w, http.StatusNotFound, metav1.StatusReasonNotFound, fmt.Sprintf("events %q not found", name))
}

func isWatch(r *http.Request) bool {
	watch := r.URL.Query().Get("watch")
	return watch == "1" || watch == "true"
}

// holdWatch answers a watch with a stream that never carries an event: these
// objects never change. It ends at timeoutSeconds or when the client leaves.
func holdWatch(w http.ResponseWriter, r *http.Request) {
	timeout := 30 * time.Minute
	if seconds, err := strconv.Atoi(r.URL.Query().Get("timeoutSeconds")); err == nil && seconds > 0 {
		timeout = time.Duration(seconds) * time.Second
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if flusher, ok := w.(http.Flusher); ok {
		flusher.Flush()
	}
	select {
	case <-r.Context().Done():
	case <-time.After(timeout):
	}
}

func writeJSON(w http.ResponseWriter, code int, obj interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(obj)
}

func writeStatus(w http.ResponseWriter, code int, reason metav1.StatusReason, message string) {
	writeJSON(w, code, &metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure,
		Message:  message,
		Reason:   reason,
		Code:     int32(code),
	})
}

func randomSuffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)[:5]
}
