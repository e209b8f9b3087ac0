"""Records (A-OKVQA, canonical, synthetic), images, and the curriculum datasets built from them."""
