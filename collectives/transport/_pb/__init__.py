"""Generated protobuf code (scripts/gen_proto.py from proto/transport.proto); do not edit."""
