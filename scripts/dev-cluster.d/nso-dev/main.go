// Command nso-dev is the dev cluster's own helper, started by scripts/dev-cluster:
//
//	nso-dev port                      print a free loopback port (found by binding it)
//	nso-dev apply --kubeconfig K F... server-side apply of YAML documents (CRDs first, then
//	                                  the rest once the CRDs are Established)
//	nso-dev kubelet --kubeconfig K    register nodes and run their pods: fast (kubelet.go) or,
//	  [--runtime podman --root-dir D] with podman (podman.go)
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: nso-dev port | apply --kubeconfig K FILE... | kubelet --kubeconfig K [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "port":
		err = printPort()
	case "apply":
		err = apply(os.Args[2:])
	case "kubelet":
		err = kubelet(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nso-dev %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
