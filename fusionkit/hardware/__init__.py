"""Where the work runs: one device (:mod:`.devices`), or many processes under torchrun (:mod:`.distributed`)."""
