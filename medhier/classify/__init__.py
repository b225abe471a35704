"""The hierarchical classifier (seed 000): taxonomy, model and loss, its training step and
evaluation, metrics and plots, Grad-CAM, report columns, the study roll-up and its SR content.
It hands these pieces to the platform (``io``, ``data``, ``train``, ``infer``)."""
