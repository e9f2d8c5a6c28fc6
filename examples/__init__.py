"""Reference federated LoRA fine-tuning loop for lorafair (run ``python -m examples.federated``).

Only :mod:`examples.models` needs timm; the LoRA module, data, partitions, client semantics and
the loop import with torch alone (plus scikit-learn for the offline digits domains).
"""
