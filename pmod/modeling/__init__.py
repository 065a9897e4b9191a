"""Model components: decoder blocks, routing layer, vision towers, projector and the LLaVA model."""
