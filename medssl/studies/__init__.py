"""Studies: many trainings through the real bundles, summarised in one table and one figure.

- :mod:`medssl.studies.label_efficiency`: cine segmentation and LVEF from scratch vs MAE-pretrained, by number of
  labelled subjects (``medssl study label-efficiency``);
- :mod:`medssl.studies.dataset_size`: chest CT nodule classification from scratch vs SparK-pretrained, by label
  fraction;
- :mod:`medssl.studies.runner`: what they share (one MLflow experiment, resumable runs, CSV + markdown + PNG).
"""
