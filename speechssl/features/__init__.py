"""Frame features for HuBERT's k-means targets: extraction (``speechssl features``) and storage.

* :mod:`~speechssl.features.store`: fairseq's sharded ``<split>_<i>_<n>.npy/.len`` layout plus a
  ``.json`` index per shard; :class:`FeatureSet` reads a split back as memory maps.
* :mod:`~speechssl.features.mfcc`: 39-d Kaldi MFCC + deltas + delta-deltas at 100 Hz (iteration 1).
* :mod:`~speechssl.features.layer`: a trained model's transformer layer at 50 Hz (iteration 2+).
* :mod:`~speechssl.features.extract`: the sharded, resumable extraction loop.
"""

from speechssl.features.store import FeatureSet, FeatureStoreError, ShardFiles, shard_range

__all__ = ["FeatureSet", "FeatureStoreError", "ShardFiles", "shard_range"]
