// Command nso-dev-apiserver is a standalone Kubernetes API server for tests and
// local trials: k8s.io/apiextensions-apiserver (CustomResourceDefinitions and
// custom resources, stored in etcd) plus the few core endpoints that clients
// such as kubectl and kopf insist on.
//
// Differences from the upstream apiextensions-apiserver main:
//   - the /apis root discovery listing is served, including CRD groups, and
//     /apis/ and /version/ answer like /apis and /version;
//   - /api and /api/v1 are served with read-only namespaces and in-memory
//     Events (kopf waits for /api and posts Events);
//   - OpenAPI v2 is published (kubectl validation and `kubectl explain`);
//   - no core Kubernetes API is needed: an empty informer factory keeps
//     /readyz green, admission plugins and remote authn/authz are off.
//
// It is built and started by scripts/dev-cluster; see that script for flags.
package main

import (
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	apiextensionshelpers "k8s.io/apiextensions-apiserver/pkg/apihelpers"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	crdinformers "k8s.io/apiextensions-apiserver/pkg/client/informers/externalversions/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/version"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/cli"
)

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	// There is no core Kubernetes API behind this server: nothing to delegate
	// authentication/authorization to (client certificates in system:masters
	// are allowed everything), no informers for admission plugins.
	o.RecommendedOptions.CoreAPI = nil
	o.RecommendedOptions.Admission = nil
	o.RecommendedOptions.Authentication.RemoteKubeConfigFileOptional = true
	o.RecommendedOptions.Authentication.SkipInClusterLookup = true
	o.RecommendedOptions.Authorization.RemoteKubeConfigFileOptional = true
	o.RecommendedOptions.Features.EnablePriorityAndFairness = false

	cmd := &cobra.Command{
		Use:   "nso-dev-apiserver",
		Short: "Standalone CRD API server for tests and local trials",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return run(c, o)
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	os.Exit(cli.Run(cmd))
}

func run(c *cobra.Command, o *options.CustomResourceDefinitionsServerOptions) error {
	config, err := newConfig(o)
	if err != nil {
		return err
	}
	completed := config.Complete()
	// apiextensions disables the /apis root listing because kube-aggregator
	// serves it in a full cluster; here nothing else would.
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	generic := server.GenericAPIServer
	listCRDGroups(server.Informers.Apiextensions().V1().CustomResourceDefinitions(), generic)
	core := newCoreAPI()
	generic.Handler.NonGoRestfulMux.Handle("/api", core)
	generic.Handler.NonGoRestfulMux.HandlePrefix("/api/", core)
	return generic.PrepareRun().RunWithContext(c.Context())
}

// newConfig mirrors options.Config upstream, with OpenAPI v2, an empty
// informer factory and no service resolution.
func newConfig(o *options.CustomResourceDefinitionsServerOptions) (*apiserver.Config, error) {
	if err := o.RecommendedOptions.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{net.ParseIP("127.0.0.1")}); err != nil {
		return nil, fmt.Errorf("error creating self-signed certificates: %v", err)
	}
	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	definitions := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme)
	serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(definitions, namer)
	serverConfig.OpenAPIConfig.Info.Title = "Kubernetes"
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(definitions, namer)
	serverConfig.OpenAPIV3Config.Info.Title = "Kubernetes"
	serverConfig.BuildHandlerChainFunc = func(handler http.Handler, c *genericapiserver.Config) http.Handler {
		return trimSlash(genericapiserver.DefaultBuildHandlerChain(handler, c))
	}

	if err := o.ServerRunOptions.ApplyTo(&serverConfig.Config); err != nil {
		return nil, err
	}
	if err := o.RecommendedOptions.ApplyTo(serverConfig); err != nil {
		return nil, err
	}
	if err := o.APIEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return nil, err
	}
	// No informer is ever requested from this factory, so the informer-sync
	// readiness check passes without a core API to list from.
	client, err := kubernetes.NewForConfig(serverConfig.LoopbackClientConfig)
	if err != nil {
		return nil, err
	}
	serverConfig.SharedInformerFactory = informers.NewSharedInformerFactory(client, 0)

	return &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*o.RecommendedOptions.Etcd, serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}, nil
}

// trimSlash serves /apis/ and /version/ as /apis and /version: the
// Kubernetes Python client asks with the slash, the routes have none.
func trimSlash(handler http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/apis/" || r.URL.Path == "/version/" {
			r.URL.Path = strings.TrimSuffix(r.URL.Path, "/")
		}
		handler.ServeHTTP(w, r)
	})
}

// noServices rejects conversion webhooks that name a Service: there are none.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: this API server has no Services", namespace, name)
}

// listCRDGroups keeps the legacy (unaggregated) /apis listing in step with
// the CRDs. apiextensions only feeds the aggregated listing and the per-group
// documents; clients such as kopf and the Python client read the legacy one.
func listCRDGroups(crds crdinformers.CustomResourceDefinitionInformer, server *genericapiserver.GenericAPIServer) {
	sync := func(obj interface{}) {
		if tombstone, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = tombstone.Obj
		}
		changed, ok := obj.(*apiextensionsv1.CustomResourceDefinition)
		if !ok {
			return
		}
		group := changed.Spec.Group
		all, err := crds.Lister().List(labels.Everything())
		if err != nil {
			return
		}
		seen := map[string]bool{}
		versions := []metav1.GroupVersionForDiscovery{}
		for _, crd := range all {
			if crd.Spec.Group != group || !apiextensionshelpers.IsCRDConditionTrue(crd, apiextensionsv1.Established) {
				continue
			}
			for _, v := range crd.Spec.Versions {
				if v.Served && !seen[v.Name] {
					seen[v.Name] = true
					versions = append(versions, metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v.Name, Version: v.Name})
				}
			}
		}
		if len(versions) == 0 {
			server.DiscoveryGroupManager.RemoveGroup(group)
			return
		}
		sort.SliceStable(versions, func(i, j int) bool {
			return version.CompareKubeAwareVersionStrings(versions[i].Version, versions[j].Version) > 0
		})
		server.DiscoveryGroupManager.AddGroup(metav1.APIGroup{Name: group, Versions: versions, PreferredVersion: versions[0]})
	}
	crds.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    sync,
		UpdateFunc: func(_, obj interface{}) { sync(obj) },
		DeleteFunc: sync,
	})
}
