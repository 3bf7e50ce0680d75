"""Distribution matching: ``dmd2`` (two time scales, GAN head, backward simulation; Decoupled DMD as an option) and
``phased_dmd`` (one expert per noise phase). Pure math in ``functional``, roles on the shared base in ``roles``."""
