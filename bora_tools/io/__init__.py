"""Files in and out: JSON, atomic outputs, safetensors headers and streaming writes, model directories,
and the Hub (``hub_input`` turns Hub ids into cached snapshots; ``hub_client``: tokens and errors).

Nothing here knows what BoRA is. ``core`` and the commands read and write through these modules.
"""

from bora_tools.io.atomic import atomic_output, check_target, refuse_output_over_inputs
from bora_tools.io.json import read_json
from bora_tools.io.model_dir import ModelDir, TensorEntry
from bora_tools.io.safetensors import SafetensorsWriter, TensorSpec

__all__ = ["ModelDir", "SafetensorsWriter", "TensorEntry", "TensorSpec", "atomic_output", "check_target",
           "read_json", "refuse_output_over_inputs"]
