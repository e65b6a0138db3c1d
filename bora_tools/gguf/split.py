"""Split GGUFs (``--split-max-size``): llama.cpp's format, written by gguf-py.

llama.cpp loads a model split into ``NAME-00001-of-0000N.gguf``, ``NAME-00002-of-0000N.gguf``, ...
from the first file; each shard carries ``split.no``, ``split.count`` and ``split.tensors.count``, and the
first one all the metadata. gguf-py's ``GGUFWriter`` writes that format itself when given
``split_max_size`` (the same code as ``convert_hf_to_gguf.py --split-max-size``): a shard gets tensors
until the next one would take its tensor data past the size, so a shard is at most the size plus its
header (about 1 MB for a vocabulary), and a tensor larger than the size has a shard of its own. A model
whose tensors fit in one shard is written as one plain file, as gguf-py and llama.cpp's converter do.

Files made by llama.cpp's quantizer (one file) are split afterwards by copying them through the same
writer (``split_file``): the metadata and the tensors' bytes as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from bora_tools.errors import ValidationError
from bora_tools.io.atomic import existing_shards

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}


def parse_split_size(text: str | int) -> int:
    """``--split-max-size``: bytes, or a number with ``K``, ``M`` or ``G`` (powers of 1000, as llama.cpp's tools).

    Example: ``parse_split_size("500M")`` -> ``500000000``; ``parse_split_size("4G")`` -> ``4000000000``

    Raises:
        ValidationError: not such a size, or 0.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        found = _SIZE.match(str(text))
        if not found:
            raise ValidationError(f"`split_max_size` {text!r}: expected bytes or a number with K, M or G "
                                  "(e.g. 500M, 4G)")
        size = int(found.group(1)) * _UNITS[found.group(2).upper()]
    if size < 1:
        raise ValidationError(f"`split_max_size` {text!r}: expected a positive size")
    return size


def split_file(src: Path, dst: Path, *, max_size: int) -> None:
    """Copy the GGUF ``src`` to ``dst``, split as ``GGUFWriter(split_max_size=max_size)`` splits.

    Every key-value is copied (gguf-py's own ``gguf_new_metadata`` way), and every tensor's bytes as
    they are: nothing is converted.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(None, arch, split_max_size=max_size)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith(("GGUF.", "split.")):
            continue  # GGUFWriter writes these itself
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    try:
        writer.write_header_to_file(path=Path(dst))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.flush()
    finally:
        writer.close()


def written_files(out: Path) -> list[Path]:
    """The files an export to ``out`` left: ``out`` itself, or its shards in order."""
    shards = existing_shards(out)
    return shards if shards and not out.exists() else [out]
