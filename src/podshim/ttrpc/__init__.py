"""ttrpc for podshim: a sans-IO codec (:mod:`.codec`, :mod:`.protocol`) and asyncio
transports (:mod:`.server`, :mod:`.client`).

The package imports nothing eagerly; import the submodule you need.
"""
