"""Who is who: site identity keys, the federation's certificates and roster, strict JSON, safe text."""
