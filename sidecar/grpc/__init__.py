"""Transport: servicers, protobuf <-> domain converters, status mapping, the server."""
