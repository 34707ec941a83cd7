"""What a calibrated simulator answers: what-if and compare (`outcomes`), screening
(`screen`), order search and the next real run (`search`), and the HTML report (`report`)."""
