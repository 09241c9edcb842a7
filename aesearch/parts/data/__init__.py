"""The data part: built-in benchmarks and the user's own tables, arrays and image folders.

`config` is the `data:` section; `builtin` and `sources` read the data; `load` splits, scales and
fingerprints it into `Data`; `spec` says what it is (`DataSpec`), for the other parts and for
every checkpoint.
"""

from aesearch.parts.data.builtin import DATASETS, default_data_dir
from aesearch.parts.data.config import DataConfig
from aesearch.parts.data.load import Data, fingerprint, load_data
from aesearch.parts.data.sources import Inputs, check_fits, decode_rows, encode_array, encode_frame, read_inputs
from aesearch.parts.data.spec import CATEGORICAL, IMAGE, NUMERIC, VECTOR, Column, DataSpec

__all__ = ["CATEGORICAL", "DATASETS", "IMAGE", "NUMERIC", "VECTOR", "Column", "Data", "DataConfig", "DataSpec", "Inputs",
           "check_fits", "decode_rows", "default_data_dir", "encode_array", "encode_frame", "fingerprint", "load_data", "read_inputs"]
