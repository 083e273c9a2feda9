"""The self-contained Hugging Face modelling file that `mgt-export` copies into an exported
directory (`modeling_mgt.py`, loaded with `trust_remote_code=True`). It imports only torch and
transformers, never megatron_mgt, so it is not imported from the package."""

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_mgt.py")
