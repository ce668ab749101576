//go:build legacygrpc

package main

import "google.golang.org/grpc"

// dial for grpc-go older than the pinned one, built with -tags legacygrpc: before 1.63
// there is no grpc.NewClient and before 1.34 no credentials/insecure. CI builds this
// way against Debian's grpc-go 1.33 (build-offline.sh). Dial takes the same host:port
// and unix: addresses as dial.go does.
func dial(address string) (*grpc.ClientConn, error) {
	return grpc.Dial(address, grpc.WithInsecure())
}
