"""fedmeta's Flower ClientApp."""
