#!/usr/bin/env python3
"""Writes the .proto files under bridge/wire/proto from the XMTP wire reference (WIRE.md).

The reference lists every message, field, enum and RPC of the XMTP packages Gatehouse uses, at
the xmtp/proto revision DESIGN.md names. Run it again when the reference changes:
    python3 bridge/wire/tools/wire2proto.py ../shared/testdata/xmtp-v3-wire/WIRE.md bridge/wire/proto
"""
import os, re, sys
from collections import defaultdict, OrderedDict

SKIP_PACKAGES = {"xmtp.migration.api.v1"}
# Legacy (v2) types we never interpret: carried as opaque bytes, which keeps their wire form.
OPAQUE = {"xmtp.message_contents.SignedPublicKey", "xmtp.message_contents.Signature"}
MAPS = {
    "xmtp.mls.message_contents.EncodedContent.ParametersEntry": ("string", "string"),
    "xmtp.mls.message_contents.GroupMutableMetadataV1.AttributesEntry": ("string", "string"),
    "xmtp.mls.message_contents.GroupMembership.MembersEntry": ("string", "uint64"),
    "xmtp.mls.message_contents.PolicySet.UpdateMetadataPolicyEntry": ("string", ".xmtp.mls.message_contents.MetadataPolicy"),
    "xmtp.mls.message_contents.content_types.WalletSendCalls.CapabilitiesEntry": ("string", "string"),
    "xmtp.mls.message_contents.content_types.Call.MetadataEntry": ("string", "string"),
}
SCALARS = {"string", "bytes", "bool", "uint32", "uint64", "int32", "int64", "sint64", "fixed64", "double", "float"}

src, out = sys.argv[1], sys.argv[2]
files = OrderedDict()  # file -> {"package", "messages": OrderedDict(name->fields), "enums": {}, "services": {}}
cur = None
cur_msg = None
for line in open(src, encoding="utf-8"):
    line = line.rstrip("\n")
    m = re.match(r"^## package (\S+) — file (\S+)", line)
    if m:
        pkg, f = m.groups()
        cur = files.setdefault(f, {"package": pkg, "messages": OrderedDict(), "enums": OrderedDict(), "services": OrderedDict()})
        cur_msg = None
        continue
    if cur is None:
        continue
    m = re.match(r"^enum (\S+): (.*)$", line)
    if m:
        full, vals = m.groups()
        cur["enums"][full] = [v.split("=") for v in vals.split(", ")]
        continue
    m = re.match(r"^### service (\S+)", line)
    if m:
        cur_msg = None
        cur["services"][m.group(1)] = []
        cur_svc = cur["services"][m.group(1)]
        continue
    m = re.match(r"^- `(\w+)`\((\S+)\) → (stream )?(\S+)", line)
    if m:
        cur_svc.append(m.groups())
        continue
    m = re.match(r"^### (\S+)$", line)
    if m:
        cur_msg = m.group(1)
        cur["messages"][cur_msg] = []
        continue
    m = re.match(r"^\| (\d+) \| (\w+) \| (\S+) \| ?(.*?) ?\|$", line)
    if m and cur_msg:
        cur["messages"][cur_msg].append(m.groups())

defined = {}
for f, d in files.items():
    for n in list(d["messages"]) + list(d["enums"]):
        defined[n] = f

def rel(pkg, full):
    return full[len(pkg) + 1:] if full.startswith(pkg + ".") else full

def ftype(t):
    if t in SCALARS:
        return t
    if t in OPAQUE or (t not in defined and t != "google.protobuf.Empty"):
        # Types the reference does not define (legacy v2, backup archives) stay opaque bytes.
        return "bytes"
    if t == "google.protobuf.Empty":
        return ".google.protobuf.Empty"
    return "." + t

for f, d in files.items():
    pkg = d["package"]
    if pkg in SKIP_PACKAGES:
        continue
    imports = set()
    # Tree of nested names.
    tree = OrderedDict()
    def node(path):
        t = tree
        for p in path:
            t = t.setdefault(p, OrderedDict())
        return t
    for n in d["messages"]:
        node(rel(pkg, n).split("."))
    for n in d["enums"]:
        parts = rel(pkg, n).split(".")
        if len(parts) > 1:
            node(parts[:-1])
    lines = []
    def emit(path, indent):
        full = pkg + "." + ".".join(path)
        pad = "  " * indent
        if full in d["enums"] and full not in d["messages"]:
            return
        lines.append(f"{pad}message {path[-1]} {{")
        for en, vals in d["enums"].items():
            if en.rsplit(".", 1)[0] == full:
                lines.append(f"{pad}  enum {en.rsplit('.', 1)[1]} {{")
                for k, v in vals:
                    lines.append(f"{pad}    {k} = {v};")
                lines.append(f"{pad}  }}")
        for child in node(path):
            emit(path + [child], indent + 1)
        oneofs = OrderedDict()
        for num, name, t, label in d["messages"].get(full, []):
            if label.startswith("oneof "):
                oneofs.setdefault(label[6:], []).append((num, name, t))
                continue
            if t in MAPS:
                k, v = MAPS[t]
                lines.append(f"{pad}  map<{k}, {v}> {name} = {num};")
                continue
            if t in defined and defined[t] != f:
                imports.add(defined[t])
            if t == "google.protobuf.Empty":
                imports.add("google/protobuf/empty.proto")
            lab = {"repeated": "repeated ", "optional": "optional "}.get(label, "")
            lines.append(f"{pad}  {lab}{ftype(t)} {name} = {num};")
        for o, fs in oneofs.items():
            lines.append(f"{pad}  oneof {o} {{")
            for num, name, t in fs:
                if t in defined and defined[t] != f:
                    imports.add(defined[t])
                lines.append(f"{pad}    {ftype(t)} {name} = {num};")
            lines.append(f"{pad}  }}")
        lines.append(f"{pad}}}")
    for en, vals in d["enums"].items():
        if "." not in rel(pkg, en):
            lines.append(f"enum {rel(pkg, en)} {{")
            for k, v in vals:
                lines.append(f"  {k} = {v};")
            lines.append("}")
    for top in tree:
        emit([top], 0)
    for s, rpcs in d["services"].items():
        lines.append(f"service {rel(pkg, s)} {{")
        for name, req, stream, resp in rpcs:
            for t in (req, resp):
                if t in defined and defined[t] != f:
                    imports.add(defined[t])
                if t == "google.protobuf.Empty":
                    imports.add("google/protobuf/empty.proto")
            st = "stream " if stream else ""
            lines.append(f"  rpc {name}({ftype(req)}) returns ({st}{ftype(resp)});")
        lines.append("}")
    path = os.path.join(out, f)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("// Generated by bridge/wire/tools/wire2proto.py from the XMTP wire reference\n")
        fh.write("// (xmtp/proto revision 602f7056). Do not edit by hand.\n")
        fh.write('syntax = "proto3";\n\n')
        fh.write(f"package {pkg};\n\n")
        for i in sorted(imports):
            fh.write(f'import "{i}";\n')
        if imports:
            fh.write("\n")
        fh.write("\n".join(lines) + "\n")
    print(path)
