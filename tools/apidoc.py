"""Write the API reference (docs/api.md) from the comments in proto/sidecar/v1.

`make proto` runs this with the stubs; a test renders it again and compares, so the
reference never falls behind the contract. The comments are the documentation: buf lint
(COMMENTS) makes sure every service, RPC, message, field, enum and value has one.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2

from tools.protogen import PACKAGE, PROTO_ROOT, ROOT, googleapis_include

OUT = ROOT / "docs" / "api.md"
# FieldDescriptorProto.type -> the name a .proto file uses.
SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}
# SourceCodeInfo paths: the field numbers of FileDescriptorProto and friends.
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, NESTED, NESTED_ENUM = 2, 3, 4
VALUE, METHOD = 2, 2


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    """Compile the contract with its comments (source info) into a FileDescriptorSet."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    wkt = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "contract.binpb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{googleapis_include()}",
            f"-I{wkt}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class File:
    """One .proto file: its comments by source path."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.proto = proto
        # "// text" reaches here as " text": drop that one space, keep deeper indents.
        self.comments = {
            tuple(loc.path): "\n".join(
                line.removeprefix(" ").rstrip() for line in loc.leading_comments.splitlines()
            ).strip("\n")
            for loc in proto.source_code_info.location
            if loc.leading_comments
        }

    def comment(self, *path: int) -> str:
        return self.comments.get(path, "")


def anchor(full_name: str) -> str:
    return full_name.lower().replace(".", "")


def type_link(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in SCALARS:
        return f"`{SCALARS[field.type]}`"
    name = field.type_name.lstrip(".")
    if not name.startswith("sidecar."):
        return f"`{name}`"
    return f"[`{name.removeprefix('sidecar.v1.')}`](#{anchor(name)})"


def cell(text: str) -> str:
    """A comment as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def paragraph(text: str) -> str:
    """A comment as Markdown: its lines kept, indented blocks (tables of codes) fenced."""
    lines = text.splitlines()
    out: list[str] = []
    fenced = False
    for line in lines:
        indented = line.startswith("  ")
        if indented != fenced:
            out.append("```")
            fenced = indented
        out.append(line)
    if fenced:
        out.append("```")
    return "\n".join(out)


def render_message(
    file: File, message: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...]
) -> Iterator[str]:
    full = f"{prefix}.{message.name}"
    if message.options.map_entry:
        return
    yield f'### {full.removeprefix("sidecar.v1.")} <a id="{anchor(full)}"></a>'
    yield ""
    yield paragraph(file.comment(*path))
    yield ""
    if message.field:
        oneofs = [o.name for o in message.oneof_decl]
        yield "| field | number | type | description |"
        yield "|---|---|---|---|"
        for index, field in enumerate(message.field):
            kind = type_link(field)
            if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
                kind = f"repeated {kind}"
            elif field.proto3_optional:
                kind = f"optional {kind}"
            elif field.HasField("oneof_index"):
                kind = f"{kind} (oneof `{oneofs[field.oneof_index]}`)"
            note = cell(file.comment(*path, FIELD, index))
            yield f"| `{field.name}` | {field.number} | {kind} | {note} |"
        yield ""
    for index, nested in enumerate(message.nested_type):
        yield from render_message(file, nested, full, (*path, NESTED, index))
    for index, enum in enumerate(message.enum_type):
        yield from render_enum(file, enum, full, (*path, NESTED_ENUM, index))


def render_enum(
    file: File, enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...]
) -> Iterator[str]:
    full = f"{prefix}.{enum.name}"
    yield f'### {full.removeprefix("sidecar.v1.")} <a id="{anchor(full)}"></a>'
    yield ""
    yield paragraph(file.comment(*path))
    yield ""
    yield "| value | number | description |"
    yield "|---|---|---|"
    for index, value in enumerate(enum.value):
        yield f"| `{value.name}` | {value.number} | {cell(file.comment(*path, VALUE, index))} |"
    yield ""


def render(contract: descriptor_pb2.FileDescriptorSet) -> str:
    files = [File(f) for f in contract.file if f.package == "sidecar.v1"]
    lines = [
        "# API reference: `sidecar.v1`",
        "",
        "Generated from the comments in `proto/sidecar/v1/` by `make proto` "
        "(`tools/apidoc.py`); do not edit.",
        "",
    ]
    for file in files:
        for index, service in enumerate(file.proto.service):
            full = f"sidecar.v1.{service.name}"
            lines += [f'## {full} <a id="{anchor(full)}"></a>', ""]
            lines += [paragraph(file.comment(SERVICE, index)), ""]
            lines += ["| RPC | request | response | description |", "|---|---|---|---|"]
            for number, method in enumerate(service.method):
                request = method.input_type.lstrip(".")
                response = method.output_type.lstrip(".")
                streams = "stream " if method.client_streaming else ""
                answers = "stream " if method.server_streaming else ""
                note = cell(file.comment(SERVICE, index, METHOD, number))
                lines.append(
                    f"| `{method.name}` | {streams}[`{request.removeprefix('sidecar.v1.')}`]"
                    f"(#{anchor(request)}) | {answers}[`{response.removeprefix('sidecar.v1.')}`]"
                    f"(#{anchor(response)}) | {note} |"
                )
            lines.append("")
    for file in files:
        lines += [f"## Messages and enums of `{file.proto.name}`", ""]
        header = file.comment(12)  # the file's syntax line carries its leading comment
        if header:
            lines += [paragraph(header), ""]
        for index, message in enumerate(file.proto.message_type):
            lines += render_message(file, message, "sidecar.v1", (MESSAGE, index))
        for index, enum in enumerate(file.proto.enum_type):
            lines += render_enum(file, enum, "sidecar.v1", (ENUM, index))
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT, help="Markdown file to write")
    out = parser.parse_args().out
    out.write_text(render(descriptors()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
