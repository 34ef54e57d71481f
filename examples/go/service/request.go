package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"strconv"
)

// forwardBody is the JSON of POST /forward. Values are kept raw so that a bad one is reported
// by its row and column, which encoding/json's own errors do not give.
type forwardBody struct {
	Tokens [][]json.RawMessage `json:"tokens"`
	Hidden [][]json.RawMessage `json:"hidden"`
}

// request is a validated POST /forward: rows of the model's input, flattened.
type request struct {
	rows   int
	tokens []int32
	hidden []float32
}

// parse checks the media type, reads at most BodyLimit bytes, refuses anything after the JSON
// value, and validates the rows: count, width, and every value (token ids in the vocabulary,
// finite float32 hidden values).
func (s *Service) parse(w http.ResponseWriter, r *http.Request) (*request, *apiError) {
	media, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || media != "application/json" {
		return nil, &apiError{Status: http.StatusUnsupportedMediaType, Code: "unsupported_media_type",
			Message: fmt.Sprintf("Content-Type %q: send application/json", r.Header.Get("Content-Type"))}
	}
	body := http.MaxBytesReader(w, r.Body, s.bodyLimit)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	var b forwardBody
	if err := dec.Decode(&b); err != nil {
		return nil, s.bodyError(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		if err != nil {
			if e := s.bodyError(err); e.Code == "body_too_large" {
				return nil, e
			}
		}
		return nil, &apiError{Status: http.StatusBadRequest, Code: "trailing_data",
			Message: fmt.Sprintf("the body continues after its JSON value (at byte %d)", dec.InputOffset())}
	}
	in, want, other := b.Tokens, "tokens", b.Hidden
	if s.info.InputKind == "hidden" {
		in, want, other = b.Hidden, "hidden", b.Tokens
	}
	if other != nil {
		return nil, &apiError{Status: http.StatusBadRequest, Code: "wrong_input",
			Message: fmt.Sprintf("this model takes %q rows", want)}
	}
	rows := len(in)
	if rows == 0 {
		return nil, &apiError{Status: http.StatusBadRequest, Code: "bad_shape",
			Message: fmt.Sprintf("no rows: send {%q: [[...], ...]}", want)}
	}
	if rows > s.cfg.MaxRequestRows {
		return nil, &apiError{Status: http.StatusBadRequest, Code: "too_many_rows",
			Message: fmt.Sprintf("%d rows; a request has at most %d", rows, s.cfg.MaxRequestRows)}
	}
	width := s.info.InputWidth
	req := &request{rows: rows}
	if want == "tokens" {
		req.tokens = make([]int32, 0, rows*width)
	} else {
		req.hidden = make([]float32, 0, rows*width)
	}
	for i, row := range in {
		if len(row) != width {
			r, _ := at(i, -1)
			return nil, &apiError{Status: http.StatusBadRequest, Code: "bad_shape", Row: r,
				Message: fmt.Sprintf("row %d has %d values; the model takes %d per row", i, len(row), width)}
		}
		for j, raw := range row {
			if want == "tokens" {
				id, err := strconv.ParseInt(string(raw), 10, 32)
				if err != nil || id < 0 || id >= int64(s.info.VocabSize) {
					r, c := at(i, j)
					return nil, &apiError{Status: http.StatusBadRequest, Code: "bad_token", Row: r, Column: c,
						Message: fmt.Sprintf("token %s at row %d, column %d is not an id in [0, %d)", raw, i, j, s.info.VocabSize)}
				}
				req.tokens = append(req.tokens, int32(id))
				continue
			}
			v, err := strconv.ParseFloat(string(raw), 32)
			if err != nil || math.IsInf(v, 0) {
				r, c := at(i, j)
				return nil, &apiError{Status: http.StatusBadRequest, Code: "bad_value", Row: r, Column: c,
					Message: fmt.Sprintf("value %s at row %d, column %d is not a finite float32", raw, i, j)}
			}
			req.hidden = append(req.hidden, float32(v))
		}
	}
	return req, nil
}

func (s *Service) bodyError(err error) *apiError {
	var tooLarge *http.MaxBytesError
	var syntax *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &tooLarge):
		return &apiError{Status: http.StatusRequestEntityTooLarge, Code: "body_too_large",
			Message: fmt.Sprintf("the body exceeds %d bytes, the limit for %d rows of %d values",
				s.bodyLimit, s.cfg.MaxRequestRows, s.info.InputWidth)}
	case errors.As(err, &syntax):
		return &apiError{Status: http.StatusBadRequest, Code: "bad_json",
			Message: fmt.Sprintf("invalid JSON at byte %d: %v", syntax.Offset, err)}
	case errors.As(err, &typeErr):
		return &apiError{Status: http.StatusBadRequest, Code: "bad_json",
			Message: fmt.Sprintf("field %q at byte %d: %v is not what the API takes", typeErr.Field, typeErr.Offset, typeErr.Value)}
	case errors.Is(err, io.EOF):
		return &apiError{Status: http.StatusBadRequest, Code: "bad_json", Message: "the body is empty"}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return &apiError{Status: http.StatusBadRequest, Code: "bad_json", Message: "the body ends inside its JSON value"}
	}
	return &apiError{Status: http.StatusBadRequest, Code: "bad_json", Message: err.Error()}
}
