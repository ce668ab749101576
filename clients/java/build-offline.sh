#!/bin/sh
# Builds the Java caller with no Maven repository, from Debian bookworm's packages (installed
# by `make debian-tools`): protoc 3.21, grpc_java_plugin 1.41, and the jars under
# /usr/share/java (grpc-java 1.41, protobuf-java 3.21 with its util, proto-google-common-protos
# 1.16, netty 4.1, guava, gson, perfmark). tests/integration/test_java_client.py runs it;
# users with Maven Central use pom.xml instead (see README.md).
#
#   clients/java/build-offline.sh OUT.jar   writes a runnable jar: java -jar OUT.jar [args]
#
# The jar's manifest names Debian's jars by absolute path (Class-Path), so it runs where they
# are installed. Nothing is written into the repository.
set -eu

out=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
root=$(cd "$(dirname "$0")/../.." && pwd)
java=/usr/share/java
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# What the generated code and the caller need at compile and run time. Debian's libgrpc-java
# declares none of grpc's own dependencies, so they are listed here one by one.
jars="grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub
protobuf protobuf-util proto-google-common-protos guava gson perfmark-api
netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks
netty-common netty-handler netty-handler-proxy netty-resolver netty-transport"
classpath=
manifest=
for jar in $jars; do
	test -f "$java/$jar.jar" || { echo "missing $java/$jar.jar" >&2; exit 1; }
	classpath=$classpath${classpath:+:}$java/$jar.jar
	manifest="$manifest $java/$jar.jar"
done

# 1. The stubs: messages from protoc, InferenceGrpc and ModelsGrpc from grpc_java_plugin.
#    google/rpc/status.proto comes from the proto-google-common-protos jar, as in the pom, so
#    the import and the com.google.rpc.Status class on the classpath are the same file.
mkdir -p "$work/deps" "$work/gen" "$work/classes"
(cd "$work/deps" && jar xf "$java/proto-google-common-protos.jar" google/rpc/status.proto)
protoc -I "$root/proto" -I "$work/deps" \
	--plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
	--java_out="$work/gen" --grpc-java_out="$work/gen" \
	"$root"/proto/sidecar/v1/*.proto

# 2. The stubs and the caller as committed, for Java 11 as the pom sets, warnings as errors.
#    Annotations needed at compile time only: @javax.annotation.Generated on the plugin's
#    classes (Java 11 lacks it; the pom takes it from tomcat's annotations-api) and the
#    Error Prone ones guava's classes carry.
annotations=$java/geronimo-annotation-1.3-spec.jar:$java/error-prone-annotations.jar
find "$work/gen" "$root/clients/java/src/main/java" -name '*.java' >"$work/sources"
javac --release 11 -Xlint:all,-processing,-options -Werror -encoding UTF-8 \
	-cp "$classpath:$annotations" \
	-d "$work/classes" @"$work/sources"

# 3. A runnable jar whose manifest carries the classpath, one jar a continuation line (a
#    manifest line holds at most 72 bytes; the second space separates the entries).
{
	echo "Main-Class: dev.sidecar.example.Main"
	prefix="Class-Path: "
	for jar in $manifest; do
		echo "$prefix$jar"
		prefix="  "
	done
} >"$work/manifest"
jar --create --file "$out" --manifest "$work/manifest" -C "$work/classes" .
