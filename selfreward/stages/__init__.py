"""One module per stage of the loop, one entry function each; stages talk only through the run directory."""
