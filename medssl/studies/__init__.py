"""Studies: many trainings through the real bundles, summarised in one table and one figure.

- :mod:`medssl.studies.label_efficiency`: cine segmentation and LVEF from scratch vs MAE-pretrained, by number of
  labelled subjects (``medssl study label-efficiency``).
"""
