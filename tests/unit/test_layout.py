"""Python's view of every kernel struct matches bpf/sluice.h, as compiled by a C compiler."""

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.kernel.structs import DNS_MARK, MIRRORS, Event
from pipeline.kernel.event_layout import RECORD, BpfBlockedEvent

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to check struct layouts (./bootstrap installs it)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "sluice.h"', "int main(void){",
             'printf("{");']
    first = True
    for struct, mirror in MIRRORS.items():
        for name, *_ in mirror._fields_:
            sep = "" if first else ","
            first = False
            lines.append(f'printf("{sep}\\"{struct}.{name}\\":[%zu,%zu]", '
                         f"offsetof(struct {struct}, {name}), "
                         f"sizeof(((struct {struct}*)0)->{name}));")
        lines.append(f'printf(",\\"{struct}\\":[0,%zu]", sizeof(struct {struct}));')
    lines.append('printf(",\\"SLUICE_DNS_MARK\\":[%d,0]", SLUICE_DNS_MARK);')
    lines += ['printf("}");', "return 0;}"]
    src = tmp_path_factory.mktemp("layout") / "layout.c"
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", f"-I{BPF_DIR}", "-o", str(exe), str(src)], check=True)
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True,
                                     text=True).stdout)


@pytest.mark.parametrize("struct", sorted(MIRRORS))
def test_ctypes_mirror_matches_c(c_layout, struct):
    mirror = MIRRORS[struct]
    assert c_layout[struct] == [0, ctypes.sizeof(mirror)]
    for name, *_ in mirror._fields_:
        field = getattr(mirror, name)
        assert c_layout[f"{struct}.{name}"] == [field.offset, field.size], name


def test_record_decoder_matches_the_event_struct():
    assert RECORD.size == ctypes.sizeof(Event)
    names = [f.name for f in __import__("dataclasses").fields(BpfBlockedEvent)]
    assert names == [name for name, *_ in Event._fields_]


def test_the_dns_mark_is_the_one_the_hooks_let_through(c_layout):
    assert c_layout["SLUICE_DNS_MARK"] == [DNS_MARK, 0]
