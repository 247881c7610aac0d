// Command health computes the health of one Kubernetes object the way two
// GitOps tools do: kstatus (sigs.k8s.io/cli-utils, what Flux uses) and an
// Argo CD Lua health check run with gopher-lua (the Lua engine Argo CD
// embeds). It reads the object as JSON on stdin, runs the Lua script named
// by its only argument with the object as the global `obj`, and prints
// {"kstatus": {"status", "message"}, "argocd": {"status", "message"}}.
//
// Tandem's tests use it against HybridApps fetched from the local API
// server, so the health the tools would show is checked, not assumed.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: health SCRIPT.lua < object.json")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "health:", err)
		os.Exit(1)
	}
}

func run(script string, in io.Reader, out io.Writer) error {
	raw, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("read the object: %w", err)
	}
	// As the API machinery decodes it (integers as int64), the way both
	// tools see it.
	decoded := &unstructured.Unstructured{}
	if err := decoded.UnmarshalJSON(raw); err != nil {
		return fmt.Errorf("decode the object: %w", err)
	}
	object := decoded.Object
	computed, err := status.Compute(decoded)
	if err != nil {
		return fmt.Errorf("kstatus: %w", err)
	}
	argo, err := argoHealth(script, object)
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(map[string]verdict{
		"kstatus": {Status: computed.Status.String(), Message: computed.Message},
		"argocd":  argo,
	})
}

// argoHealth runs the health script as Argo CD does: `obj` is the object,
// and the script returns a table with `status` and `message`.
func argoHealth(script string, object map[string]interface{}) (verdict, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	// The libraries Argo CD opens for health scripts.
	for _, open := range []struct {
		name string
		fn   lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		state.Push(state.NewFunction(open.fn))
		state.Push(lua.LString(open.name))
		state.Call(1, 0)
	}
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoFile(script); err != nil {
		return verdict{}, fmt.Errorf("the health script: %w", err)
	}
	table, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return verdict{}, fmt.Errorf("the health script returned %s, not a table", state.Get(-1).Type())
	}
	return verdict{
		Status:  lua.LVAsString(table.RawGetString("status")),
		Message: lua.LVAsString(table.RawGetString("message")),
	}, nil
}

func toLua(state *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		table := state.NewTable()
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	case map[string]interface{}:
		table := state.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(state, item))
		}
		return table
	default:
		return lua.LString(fmt.Sprint(v))
	}
}
