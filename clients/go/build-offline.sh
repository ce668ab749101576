#!/bin/sh
# Builds the Go caller with no module proxy, from Debian bookworm's packages (installed
# by `make debian-tools`): Go 1.19, grpc-go 1.33, protobuf-go 1.28 and genproto, all as
# sources under /usr/share/gocode, built in GOPATH mode. tests/integration/test_go_client.py
# runs it; users with a module proxy use go.mod instead (see README.md).
#
#   clients/go/build-offline.sh OUT     writes the binary to OUT
#
# PROTO_DEPS: a directory holding google/rpc/status.proto (default: build/proto-deps,
# which `make contract-deps` lays out). Nothing is written into the repository.
set -eu

out=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
root=$(cd "$(dirname "$0")/../.." && pwd)
deps=${PROTO_DEPS:-$root/build/proto-deps}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# GOPATH mode: the scratch tree first (the stubs and the caller), then Debian's sources.
export GO111MODULE=off GOFLAGS= GOPATH="$work:/usr/share/gocode"

# 1. protoc-gen-go from Debian's protobuf-go source; protoc-gen-go-grpc is Debian's binary.
go build -o "$work/bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go

# 2. The stubs at the protos' go_package import path. status.proto is an import only: the
#    generated code takes it from genproto's google.golang.org/genproto/googleapis/rpc/status.
module=github.com/transformers-sidecar/sidecar/gen/go
mkdir -p "$work/src/$module"
protoc -I "$root/proto" -I "$deps" \
	--plugin=protoc-gen-go="$work/bin/protoc-gen-go" \
	--plugin=protoc-gen-go-grpc=/usr/bin/protoc-gen-go-grpc \
	--go_out="$work/src/$module" --go_opt=module=$module \
	--go-grpc_out="$work/src/$module" --go-grpc_opt=module=$module \
	"$root"/proto/sidecar/v1/*.proto

# 3. The caller as committed. -tags legacygrpc swaps dial.go (grpc.NewClient, grpc-go
#    1.63+) for dial_legacy.go (grpc.Dial, which 1.33 has); everything else is the same code.
caller="$work/src/github.com/transformers-sidecar/sidecar/clients/go"
mkdir -p "$caller"
cp "$root"/clients/go/*.go "$caller"
cd "$caller"
go vet -tags legacygrpc .
go build -tags legacygrpc -o "$out" .
