module moert.dev/moert

go 1.19
