"""The runtime: the code an exported bundle carries in ``scripts/runtime/``: the scan finder, the inferer
and the predictions writer that ``app.infer`` uses too, so the app and the bundle cannot drift.

Standard library, NumPy, PyTorch, Ignite, MONAI (and pydicom for DICOM) only; modules of this
package import each other relatively and nothing else of ``app``.
"""

#: the ``precision`` settings (``inferers.resolve_precision``), here for command lines whose
#: ``--help`` must not import PyTorch
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
