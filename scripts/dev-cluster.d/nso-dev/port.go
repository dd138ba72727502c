package main

import (
	"fmt"
	"math/rand"
	"net"
	"os"
	"strconv"
	"strings"
)

// printPort prints a loopback port that this process could bind just now.
//
// Ports come from below the kernel's ephemeral range, which outgoing
// connections draw from: a port there may be free when tested and taken by a
// client socket a moment later. The caller still retries on a collision (the
// port is released before the server binds it).
func printPort() error {
	low, high := 10000, ephemeralLow()-1
	if high-low < 1000 {
		low, high = 10000, 30000
	}
	for range 200 {
		port := low + rand.Intn(high-low)
		listener, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		listener.Close()
		fmt.Println(port)
		return nil
	}
	return fmt.Errorf("no free port between %d and %d", low, high)
}

func ephemeralLow() int {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	fields := strings.Fields(string(data))
	if len(fields) == 0 {
		return 32768
	}
	low, err := strconv.Atoi(fields[0])
	if err != nil {
		return 32768
	}
	return low
}
