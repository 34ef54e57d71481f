package main

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
)

// apiError is every error the API answers, as {"error": {...}}. Codes and their statuses:
//
//	400 bad_json, trailing_data, bad_shape, bad_token, bad_value, too_many_rows,
//	    wrong_input, invalid_argument, numeric
//	404 not_found            405 method_not_allowed (with an Allow header)
//	413 body_too_large       415 unsupported_media_type
//	500 internal             503 overloaded (with Retry-After), shutting_down, out_of_memory,
//	                             timeout (no answer within the write timeout)
type apiError struct {
	Status  int    `json:"-"`
	Code    string `json:"code"`
	Message string `json:"message"`
	Row     *int   `json:"row,omitempty"`
	Column  *int   `json:"column,omitempty"`
	allow   string
}

func at(row, column int) (*int, *int) {
	r, c := row, column
	if column < 0 {
		return &r, nil
	}
	return &r, &c
}

func errMethod(method, allow string) *apiError {
	return &apiError{Status: http.StatusMethodNotAllowed, Code: "method_not_allowed",
		Message: fmt.Sprintf("%s is not allowed here; allowed: %s", method, allow), allow: allow}
}

func errShuttingDown() *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Code: "shutting_down",
		Message: "the service is shutting down"}
}

func writeError(w http.ResponseWriter, e *apiError) {
	if e.allow != "" {
		w.Header().Set("Allow", e.allow)
	}
	writeJSON(w, e.Status, struct {
		Error *apiError `json:"error"`
	}{e})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"code":"internal","message":"the response could not be encoded"}}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// Response buffers, reused: a response of many rows is tens of kilobytes.
var buffers = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// writeOutputs writes {"rows": R, "width": W, "outputs": [[...], ...]} with the shortest
// representation of each float32 that reads back to the same bits (strconv's 'g', -1, 32), as
// encoding/json does, without its reflection. JSON has no NaN or infinity: a row holding one is
// an error naming the row.
func writeOutputs(w http.ResponseWriter, out []float32, rows, width int) *apiError {
	for i, v := range out {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			row, col := at(i/width, i%width)
			return &apiError{Status: http.StatusBadRequest, Code: "numeric", Row: row, Column: col,
				Message: fmt.Sprintf("the model's output is %v at row %d, column %d: the input overflows it", v, i/width, i%width)}
		}
	}
	pooled := buffers.Get().(*[]byte)
	buf := append((*pooled)[:0], `{"rows":`...)
	buf = strconv.AppendInt(buf, int64(rows), 10)
	buf = append(buf, `,"width":`...)
	buf = strconv.AppendInt(buf, int64(width), 10)
	buf = append(buf, `,"outputs":[`...)
	for r := 0; r < rows; r++ {
		if r > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '[')
		for c, v := range out[r*width : (r+1)*width] {
			if c > 0 {
				buf = append(buf, ',')
			}
			buf = appendFloat32(buf, v)
		}
		buf = append(buf, ']')
	}
	buf = append(buf, "]}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(buf)))
	w.WriteHeader(http.StatusOK)
	w.Write(buf)
	*pooled = buf
	buffers.Put(pooled)
	return nil
}

// appendFloat32 formats like encoding/json: decimal for 1e-6 <= |v| < 1e21, else exponent.
func appendFloat32(buf []byte, v float32) []byte {
	f := float64(v)
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	return strconv.AppendFloat(buf, f, format, -1, 32)
}
