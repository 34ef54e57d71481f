module moert.dev/examples

go 1.19

require moert.dev/moert v0.1.0
