// The generated sidecar.v1 stubs (gen/sidecar/v1, written by buf generate) under the
// import path of the protos' go_package. The example's go.mod points here with replace.
module github.com/transformers-sidecar/sidecar/gen/go

go 1.23

require (
	google.golang.org/genproto/googleapis/rpc v0.0.0-20240814211410-ddb44dafa142
	google.golang.org/grpc v1.67.1
	google.golang.org/protobuf v1.34.2
)

require (
	golang.org/x/net v0.28.0 // indirect
	golang.org/x/sys v0.24.0 // indirect
	golang.org/x/text v0.17.0 // indirect
)
