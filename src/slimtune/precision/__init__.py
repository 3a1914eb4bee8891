"""Numeric formats and precision: the dtype-name table and the bit-layout table of every format (`formats`), the
training precision policies (`policy`), and the guards that refuse lossy casts and poisoned weights (`guard`)."""
