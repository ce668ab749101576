//go:build !legacygrpc

package main

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// dial opens a plain-text channel: the sidecar listens on loopback or a Unix socket
// inside the pod, so there is no TLS. dial_legacy.go is the same for older grpc-go.
func dial(address string) (*grpc.ClientConn, error) {
	return grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
}
