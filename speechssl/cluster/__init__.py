"""HuBERT target clustering: k-means on frame features (``speechssl kmeans``) and frame labels
(``speechssl label``).

* :mod:`~speechssl.cluster.kmeans`: greedy k-means++ + Lloyd / mini-batch k-means in torch;
  :class:`~speechssl.cluster.kmeans.KMeansModel` (save / load / predict), settings in
  :mod:`~speechssl.cluster.settings`.
* :mod:`~speechssl.cluster.label`: ``<split>.km`` + ``dict.km.txt`` writing, and
  :func:`~speechssl.cluster.label.verify_label_lengths`, the label-count vs. duration check the HuBERT
  dataset reuses (importable without torch).
"""
