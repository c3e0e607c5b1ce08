"""Dynamic Token Filtering: the reference (:mod:`.reference`), the Triton kernel (:mod:`.triton_kernel`)
and the choice between them (:mod:`.backends`). The ``dtf`` *filter component* lives in ``plugins/filters.py``.
"""
