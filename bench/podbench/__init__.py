"""The pieces of ``bench/pod_lifecycle.py``: the runtimes compared and their private
containerd (:mod:`podbench.lab`), the measurements (:mod:`podbench.phases`), the
statistics and the printed table (:mod:`podbench.report`) and the plot
(:mod:`podbench.plot`)."""
