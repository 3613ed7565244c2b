"""TWA inside other trainers: a Lightning callback (:mod:`.lightning`, extra ``lightning``) and a
Hugging Face ``Trainer`` callback (:mod:`.hf`, extra ``hf``).

The callbacks hold no algorithm: they snapshot candidates into a
:class:`~twa_ray.store.store.CandidateStore` at the framework's hooks and, at the end of training,
hand them to the core :class:`~twa_ray.core.twa.TWA` (see :func:`._common.learn`).
Importing this package needs neither library; importing a callback module without its library
raises one ``ImportError`` naming the extra to install.
"""
