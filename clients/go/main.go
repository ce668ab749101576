// Command sidecar-example calls a transformers-sidecar: Embed, Classify, then a
// streamed Generate. It dials $TRANSFORMERS_SIDECAR_ADDRESS (host:port or
// unix:///path/to.sock; default 127.0.0.1:50051). It prints a summary, or with -json
// each reply (and each failed call's status) as one JSON line.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	sidecarv1 "github.com/transformers-sidecar/sidecar/gen/go/sidecar/v1"
)

func main() {
	classifyModel := flag.String("classify-model", "", "model for Classify (empty: the server's default)")
	generateModel := flag.String("generate-model", "", "model for Generate (empty: the server's default)")
	prompt := flag.String("prompt", "The sidecar answered", "prompt for Generate")
	flag.BoolVar(&asJSON, "json", false, "print each reply as one JSON line instead of a summary")
	flag.DurationVar(&deadline, "deadline", 2*time.Second, "deadline of the Embed and Classify calls")
	flag.Parse()

	address := os.Getenv("TRANSFORMERS_SIDECAR_ADDRESS")
	if address == "" {
		address = "127.0.0.1:50051"
	}
	conn, err := dial(address) // plain text: see dial.go
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	client := sidecarv1.NewInferenceClient(conn)

	ok := embed(client)
	ok = classify(client, *classifyModel) && ok
	ok = generate(client, *generateModel, *prompt) && ok
	if !ok {
		os.Exit(1)
	}
}

// asJSON (-json) prints replies and failures as JSON lines, for scripts and tests.
var asJSON bool

// deadline (-deadline) bounds Embed and Classify. It includes connecting, which the first
// call does.
var deadline time.Duration

// line is one line of -json output: a call's reply, or its failed status.
type line struct {
	Call    string          `json:"call"`
	Reply   json.RawMessage `json:"reply,omitempty"`
	Code    string          `json:"code,omitempty"`
	Message string          `json:"message,omitempty"`
}

func printJSON(l line) {
	out, err := json.Marshal(l)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(out))
}

// emit prints a reply as {"call": ..., "reply": ...}, the reply as protojson writes it
// (the proto's JSON mapping: lowerCamel names, enums by name, 64-bit ints as strings).
func emit(call string, reply proto.Message) {
	body, err := protojson.Marshal(reply)
	if err != nil {
		panic(err)
	}
	printJSON(line{Call: call, Reply: body})
}

// report prints a failed call's gRPC status code and message.
func report(call string, err error) {
	st, _ := status.FromError(err) // not a gRPC status: Unknown, with err's text
	if asJSON {
		printJSON(line{Call: call, Code: st.Code().String(), Message: st.Message()})
		return
	}
	fmt.Printf("%s failed: %s: %s\n", call, st.Code(), st.Message())
}

func embed(client sidecarv1.InferenceClient) bool {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	reply, err := client.Embed(ctx, &sidecarv1.EmbedRequest{
		Inputs:    []string{"Refund not received", "App crashes on login"},
		Normalize: proto.Bool(true), // optional field: a pointer, nil = the model's default
	})
	if err != nil {
		report("Embed", err)
		return false
	}
	if asJSON {
		emit("Embed", reply)
		return true
	}
	for _, e := range reply.GetEmbeddings() {
		fmt.Println("embedding:", len(e.GetValues()), "floats,", e.GetTokenCount(), "tokens, truncated:", e.GetTruncated())
	}
	meta := reply.GetMetadata()
	fmt.Printf("dimensions %d from %s on %s, %d µs\n", reply.GetDimensions(), meta.GetModel(), meta.GetDevice(), meta.GetInferenceUs())
	return true
}

func classify(client sidecarv1.InferenceClient, model string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	reply, err := client.Classify(ctx, &sidecarv1.ClassifyRequest{
		Model:  model,
		Inputs: []string{"I was charged twice this month"},
		TopK:   3,
	})
	if err != nil {
		// An embedding model answers FAILED_PRECONDITION here, naming the models that classify.
		report("Classify", err)
		return false
	}
	if asJSON {
		emit("Classify", reply)
		return true
	}
	for _, result := range reply.GetResults() {
		for _, label := range result.GetLabels() {
			fmt.Printf("label %s %.3f\n", label.GetLabel(), label.GetScore())
		}
	}
	return true
}

func generate(client sidecarv1.InferenceClient, model, prompt string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stream, err := client.Generate(ctx, &sidecarv1.GenerateRequest{
		Model:        model,
		Prompt:       prompt,
		MaxNewTokens: 32,
		Temperature:  proto.Float32(0), // greedy
	})
	if err != nil {
		report("Generate", err)
		return false
	}
	var last *sidecarv1.GenerateResponse
	for {
		step, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// A refused request (wrong task, bad parameter) also arrives here, on the first Recv.
			if last != nil && !asJSON {
				fmt.Println()
			}
			report("Generate", err)
			return false
		}
		if asJSON {
			emit("Generate", step)
		} else {
			fmt.Print(step.GetText())
		}
		last = step
	}
	if asJSON {
		return true
	}
	fmt.Println()
	// finish_reason, usage and metadata are set on the last message only.
	usage := last.GetUsage()
	fmt.Printf("finish %s, prompt %d tokens, completion %d tokens, %d cut from the prompt, model %s\n",
		last.GetFinishReason(), usage.GetPromptTokens(), usage.GetCompletionTokens(),
		usage.GetTruncatedPromptTokens(), last.GetMetadata().GetModel())
	return true
}
