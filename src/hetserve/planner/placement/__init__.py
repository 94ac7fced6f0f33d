"""hetserve's own placements of blocks over servers: server chain composition (GBP-CR, GCA) and Helix's
max-flow layer placement, with the block-server helpers they share."""
